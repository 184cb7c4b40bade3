"""A callback that kills its own process with SIGKILL, as a preemption or a node failure would (no clean-up).

Used by the resume tests through ``+callbacks.kill._target_=kill_helper.KillAtStep`` with ``tests/`` on
PYTHONPATH; not a test file.
"""

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL as the batch after ``step`` optimiser steps starts (its checkpoints of step ``step`` are written:
    Lightning runs checkpoint callbacks last in the previous batch's end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
