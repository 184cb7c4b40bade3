"""One run's set-up and tear-down, shared by train, evaluate, extract, every analysis mode and the zoo.

:func:`open_run` seeds (``cfg.seed``, data-loader workers too), resolves the run folder
(``cfg.paths.output_dir``), checks the config against the folder's record and writes it
(:func:`fusion.run.record.save_record`: a folder holding a training run of another config is refused before
anything is built), and yields a :class:`RunContext`. The body starts the loggers when it needs them
(:meth:`RunContext.start_loggers`, after building the model: a run whose build fails starts no wandb run) and
ends with :meth:`RunContext.finish`, which writes ``metrics.json``. Whatever happens, the loggers are closed
when the body ends; when it raised, the wandb run is marked failed and no ``metrics.json`` is written.

Under DDP every rank runs the whole entry point: every rank checks the record (all stop alike), rank 0 alone
writes the record, the wandb id file and ``metrics.json`` (:func:`fusion.data.distributed.is_rank_zero`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from transformers.utils import logging as hf_logging

from fusion.data.distributed import is_rank_zero
from fusion.io import write_json, write_text
from fusion.run.record import save_record

log = logging.getLogger(__name__)

METRICS = "metrics.json"
WANDB_ID = "wandb_id"


def wandb_run_id(output_dir: Path) -> str:
    """This run folder's wandb run id: made once and kept in the folder, so that a requeued or resumed job
    in the same folder continues the same wandb run."""
    path = output_dir / WANDB_ID
    if not path.is_file():
        write_text(path, secrets.token_hex(4))  # not the global RNG: seeded runs stay reproducible
    return path.read_text().strip()


def wandb_group(experiment_name: str) -> str:
    """The wandb group of a run whose ``logger.wandb.group`` is null: its sweep, so that one sweep's runs form
    one group and two sweeps two. A multirun (local, submitit's SLURM array, an Optuna search): its folder's
    name; an element of a plain ``sbatch --array`` (slurm/array.sbatch): its array job; else the experiment."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"array-{array}"
    return experiment_name


def _run_logger(cfg: DictConfig, output_dir: Path, experiment_name: str, resumable: bool) -> Logger:
    """One logger of a run's own: a wandb run is grouped by sweep and (``resumable``) keeps its id in the folder."""
    if not cfg.get("_target_", "").endswith("WandbLogger"):
        return instantiate(cfg)
    extra: dict[str, Any] = {}
    if cfg.get("group") is None:
        extra["group"] = wandb_group(experiment_name)
    # Only rank 0 keeps the id file (the other DDP ranks' wandb loggers never start a run).
    if resumable and cfg.get("id") is None and is_rank_zero():
        extra.update(id=wandb_run_id(output_dir), resume="allow")
    return instantiate(cfg, **extra)


def close_loggers(loggers: list[Logger], failed: bool = False) -> None:
    """Close the loggers' runs (a wandb run ``failed``: marked failed, as wandb's own context manager does)."""
    # A multirun executes its jobs in one process: close the wandb run so the next job gets its own.
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish(exit_code=1 if failed else None)


@dataclass
class RunContext:
    """One run: its config, what it is (``kind``: train, eval, extract, an analysis mode, zoo), its folder and
    the loggers started so far (closed when the run ends)."""

    cfg: DictConfig
    kind: str
    output_dir: Path
    loggers: list[Logger] = field(default_factory=list)

    def start_loggers(self, part: str | None = None, hyperparams: Any = None) -> list[Logger]:
        """Start ``cfg.logger``'s loggers and log ``hyperparams`` (default: the resolved config) to them.

        The run's own loggers: a training run's wandb run resumes the id kept in its folder (a requeued or resumed
        job continues it); an evaluation or analysis is a new wandb run each time, even in a folder used before;
        the group is the run's sweep (:func:`wandb_group`). With ``part`` (a zoo recipe), loggers saving into
        ``<run folder>/<part>``, a new wandb run each. Closed when the run ends, or by :meth:`close_loggers`.
        """
        chosen = [c for c in (self.cfg.get("logger") or {}).values() if c is not None]
        if part is None:
            name = str(self.cfg.get("experiment_name") or self.cfg.get("task_name") or "fusion")
            resumable = self.kind == "train"
            loggers = [_run_logger(c, self.output_dir, name, resumable) for c in chosen]
        else:
            loggers = [instantiate(c, save_dir=str(self.output_dir / part)) for c in chosen]
        if hyperparams is None:
            hyperparams = OmegaConf.to_container(self.cfg, resolve=True)
        for logger in loggers:
            logger.log_hyperparams(hyperparams)
        self.loggers.extend(loggers)
        return loggers

    def close_loggers(self, failed: bool = False) -> None:
        """Close the loggers started so far now (before a requeue stops the job; after a zoo recipe's fit)."""
        loggers, self.loggers = self.loggers, []
        close_loggers(loggers, failed=failed)

    def finish(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Write ``metrics`` to the run folder's ``metrics.json`` (rank 0: one file under DDP); returns them."""
        metrics = dict(metrics)
        if is_rank_zero():
            write_json(self.output_dir / METRICS, metrics, sort_keys=True)
        return metrics


@contextlib.contextmanager
def open_run(cfg: DictConfig, kind: str, record: bool = True) -> Iterator[RunContext]:
    """Seed, resolve the run folder, check and write its record (``record``), yield the :class:`RunContext`;
    close its loggers when the body ends (marking a wandb run failed when the body raised)."""
    pl.seed_everything(cfg.seed, workers=True)
    if not sys.stderr.isatty():
        # transformers' "Loading weights" bar (a local file, a second) would be a \r-redrawn line in a batch log
        hf_logging.disable_progress_bar()
    output_dir = Path(cfg.paths.output_dir)
    if record:
        save_record(cfg, output_dir)  # refused (on every rank) when the folder records another training run
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
    run = RunContext(cfg, kind, output_dir)
    log.debug("%s run in %s", kind, output_dir)
    try:
        yield run
    except BaseException:  # KeyboardInterrupt and a requeue's exit too: the run did not finish
        run.close_loggers(failed=True)
        raise
    run.close_loggers()
