"""Preemption and requeue on SLURM, owned by this callback (not by submitit, nor by Lightning's own handler).

SLURM sends a signal shortly before a job's time limit or preemption: ``--signal=USR1@90`` in the
``slurm/`` templates, ``USR2`` from submitit (``hydra/launcher=slurm``). On either, this callback lets the
current training step finish, saves ``checkpoints/last_requeue.ckpt`` at that step boundary (so the resume
is exact, like any step checkpoint) and stops training without evaluating; the training entry point then
finishes the loggers and asks SLURM to requeue the job (:meth:`RequeueOnSignal.requeue`, ``scontrol
requeue``), last, because the requeue stops every process of the job at once. The requeued job runs the
same command in the same run folder, resumes from its newest checkpoint (``fusion.training.resume.resume_path``)
and logs to the same wandb run (the id kept in the folder).

After the requeue the process ends by raising :class:`Requeued`, a ``SystemExit``: no ``except Exception``
on the way out catches it, so neither Hydra records the job as returned nor submitit writes a result file
for it. Under ``hydra/launcher=slurm`` that matters: submitit takes a result file as the job's end, so a
normal return would hand the sweep (and an Optuna sweeper) an empty result while the requeued job still runs.

Why not Lightning's ``SLURMEnvironment(auto_requeue=True)``: its handler saves inside the signal handler,
wherever the step is (between the optimiser step and the loop counters), and finishes the loggers while
training goes on. Lightning does not install its handler when one is installed already, so this one wins.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)

SIGNALS = ("SIGUSR1", "SIGUSR2")


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<index>`` for an array element, else the job id."""
    array, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return os.environ.get("SLURM_JOB_ID")


# Not 0: this attempt did not finish the run (SLURM has requeued the job whatever the code).
REQUEUED_EXIT_CODE = 3


class Requeued(SystemExit):
    """Raised by the training entry point after a requeue: this attempt ends, the job is not finished."""

    def __init__(self, job: str | None) -> None:
        super().__init__(REQUEUED_EXIT_CODE)
        self.job = job


class RequeueOnSignal(pl.Callback):
    """On SIGUSR1/SIGUSR2 inside a SLURM job: checkpoint at the next step boundary, requeue, stop."""

    def __init__(self, filename: str = "last_requeue.ckpt", signals: tuple[str, ...] = SIGNALS) -> None:
        self.filename = filename
        self.signals = tuple(signals)
        self.received: str | None = None
        self.stopped = False  # training stopped for a requeue; run.py then finishes the loggers and calls requeue()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only note it: the step in progress finishes first.
        self.received = signal.Signals(signum).name

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or slurm_job_id() is None:
            return
        for name in self.signals:
            signal.signal(getattr(signal, name), self._handler)
        log.info("requeue on %s: checkpoint at the next step, then scontrol requeue %s", self.signals, slurm_job_id())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        signalled = self.received is not None
        if trainer.world_size > 1:  # every process stops at the same step, or the collectives hang
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        if not signalled or self.stopped:
            return
        path = Path(trainer.default_root_dir) / "checkpoints" / self.filename
        trainer.save_checkpoint(path)
        log.warning("%s: saved %s at step %d", self.received or "signal on another rank", path, trainer.global_step)
        self.stopped = True
        trainer.should_stop = True

    def requeue(self, trainer: pl.Trainer) -> None:
        """Ask SLURM to requeue this job (global rank 0). Call it last: the requeue stops every process of the
        job at once (SIGTERM), ``scontrol`` and the loggers' helper processes (wandb's service) included, so
        the loggers must be finished before."""
        if not trainer.is_global_zero:
            return
        job = slurm_job_id()
        log.warning("requeueing SLURM job %s (scontrol requeue): its processes stop now, the job restarts", job)
        for handler in logging.getLogger().handlers:  # the line above must reach the run's log before the SIGTERM
            handler.flush()
        result = subprocess.run(["scontrol", "requeue", str(job)], capture_output=True, text=True)
        if result.returncode == 0:
            log.warning("requeued SLURM job %s", job)
        elif result.returncode < 0:
            # Killed by the job's own shutdown: the requeue took effect before scontrol could exit.
            log.warning("scontrol requeue %s was stopped by %s as SLURM requeued the job", job,
                        signal.Signals(-result.returncode).name)
        else:
            log.error("scontrol requeue %s failed (exit %d): %s", job, result.returncode,
                      (result.stderr or result.stdout).strip())
