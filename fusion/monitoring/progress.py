"""Training progress that reaches a batch log: the rich bar on a terminal, log lines everywhere else.

Lightning's rich bar draws only on a terminal: in a SLURM job's ``.out`` (or ``make train > log``) nothing
shows between the model summary and the end of training. :func:`progress_bar` (``callbacks.progress`` in
conf/callbacks/default.yaml) picks the rich bar when stdout is a terminal, else :class:`LogProgress`, a
Lightning progress bar that logs one line every ``every_n_steps`` optimiser steps or ``every_seconds``
seconds, whichever comes first, through Python logging (Hydra sends it to stdout and the run's log file)::

    train step 40/120 (33%) | epoch 2/8 batch 10/15 | train/loss 1.234 | 52.1 samples/s | elapsed 0:00:48 | ETA 0:01:36

and one line per finished epoch with the progress-bar metrics (validation included).

Long loops outside training show their progress through :mod:`fusion.counter` instead.
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.callbacks.progress import ProgressBar
from pytorch_lightning.utilities.data import extract_batch_size

from fusion.options import number

log = logging.getLogger(__name__)


def progress_bar(every_n_steps: int = 50, every_seconds: float = 60.0, terminal: bool | None = None) -> ProgressBar:
    """Lightning's rich bar when stdout is a terminal (``terminal=None``: ask ``sys.stdout.isatty()``), else
    :class:`LogProgress` with these intervals."""
    if terminal is None:
        terminal = sys.stdout.isatty()
    if terminal:
        return RichProgressBar()
    return LogProgress(every_n_steps=every_n_steps, every_seconds=every_seconds)


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _value(value: Any) -> str:
    if hasattr(value, "item"):  # a 0-d tensor
        value = value.item()
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LogProgress(ProgressBar):
    """A progress bar for logs: a line every ``every_n_steps`` steps or ``every_seconds`` seconds (0 turns
    either off), with the step out of the run's total, epoch and batch, the progress-bar metrics (the
    training loss), samples per second since the last line and the ETA; a line per finished epoch."""

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 60.0) -> None:
        super().__init__()
        steps = number("callbacks.progress.every_n_steps", every_n_steps, low=0)
        if steps != int(steps):
            raise ValueError(f"callbacks.progress.every_n_steps={every_n_steps!r}: expected a whole number >= 0")
        self.every_n_steps = int(steps)
        self.every_seconds = number("callbacks.progress.every_seconds", every_seconds, low=0)
        self._enabled = True
        self._start_time = self._last_time = self._epoch_time = 0.0
        self._start_step = self._last_step = 0
        self._samples = 0  # trained since the last line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run starts at its checkpoint's step: rates and the ETA count from here.
        self._start_time = self._last_time = self._epoch_time = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._samples = 0
        if self._enabled:
            total = trainer.estimated_stepping_batches
            log.info(
                "training from step %d of %s: a progress line every %s",
                trainer.global_step, "?" if math.isinf(total) else int(total), self._intervals(),
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_time = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._samples += extract_batch_size(batch)
        if not self._enabled:
            return
        now, step = time.monotonic(), trainer.global_step
        due_steps = self.every_n_steps > 0 and step - self._last_step >= self.every_n_steps
        due_time = self.every_seconds > 0 and now - self._last_time >= self.every_seconds
        if due_steps or due_time:
            log.info("%s", self.line(trainer, pl_module, batch_idx, now))
            self._last_time, self._last_step, self._samples = now, step, 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        metrics = " | ".join(f"{k} {_value(v)}" for k, v in self._metrics(trainer, pl_module).items())
        log.info(
            "epoch %s done at step %d in %s%s", self._epoch(trainer), trainer.global_step,
            _duration(time.monotonic() - self._epoch_time), f" | {metrics}" if metrics else "",
        )

    def line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int, now: float) -> str:
        """The progress line at ``now`` (``time.monotonic()``), after training batch ``batch_idx``."""
        step, total = trainer.global_step, trainer.estimated_stepping_batches
        parts = [f"train step {step}/?" if math.isinf(total) else f"train step {step}/{int(total)} "
                 f"({100 * step / max(total, 1):.0f}%)"]
        batches = self.total_train_batches
        parts.append(f"epoch {self._epoch(trainer)} batch {batch_idx + 1}/{'?' if math.isinf(batches) else batches}")
        parts.extend(f"{k} {_value(v)}" for k, v in self._metrics(trainer, pl_module).items())
        since = now - self._last_time
        if since > 0:
            parts.append(f"{self._samples / since:.1f} samples/s")
        elapsed, done = now - self._start_time, step - self._start_step
        parts.append(f"elapsed {_duration(elapsed)}")
        if done > 0 and not math.isinf(total):
            parts.append(f"ETA {_duration(elapsed / done * max(total - step, 0))}")
        return " | ".join(parts)

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        # The progress-bar metrics (self.log(..., prog_bar=True)); v_num is the logger's version, not progress.
        return {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}

    @staticmethod
    def _epoch(trainer: pl.Trainer) -> str:
        epochs = trainer.max_epochs
        return f"{trainer.current_epoch + 1}/{epochs}" if epochs is not None and epochs > 0 else str(
            trainer.current_epoch + 1)

    def _intervals(self) -> str:
        parts = [f"{self.every_n_steps} steps"] if self.every_n_steps else []
        parts += [f"{self.every_seconds:g} s"] if self.every_seconds else []
        return " or ".join(parts) or "epoch (callbacks.progress.every_n_steps and every_seconds are 0)"
