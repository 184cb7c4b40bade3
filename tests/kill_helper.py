"""A callback that kills its own process with SIGKILL, as a preemption or a node failure would (no clean-up).

Used by the resume tests through ``+callbacks.kill._target_=kill_helper.KillAtStep`` with ``tests/`` on
PYTHONPATH; not a test file.
"""

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL as the batch after ``step`` optimiser steps starts (its checkpoints of step ``step`` are written:
    Lightning runs checkpoint callbacks last in the previous batch's end), in a process that trained up to
    there: the same command run again resumes from step ``step`` and goes on, as a requeued job does (a run
    folder accepts only the config it started with, this callback included)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._trained = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self._trained = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._trained and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
