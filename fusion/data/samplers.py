"""Training order that survives a resume: a function of ``(seed, epoch)``, able to start partway through.

Lightning restores weights, optimiser and loop counters but not where the training loader was within its
epoch; the data module saves :func:`data_position` in every checkpoint and builds the first training loader
of a resumed run as a :class:`ResumableSampler` that skips what was already trained on
(:mod:`fusion.training.resume` restores the random number generators).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A shuffling sampler whose order is a function of ``(seed, epoch)``, that can skip the first samples.

    A :class:`DistributedSampler` so that Lightning keeps it under DDP (each process takes its share of the
    same permutation); in a single process it is one replica. ``skip`` applies to the first iteration only.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0, skip: int = 0, shuffle: bool = True):
        distributed = dist.is_available() and dist.is_initialized()
        replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        if skip < 0 or epoch < 0:
            raise ValueError(f"epoch and skip must be >= 0 (got epoch={epoch}, skip={skip})")
        self.epoch = epoch
        self._skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def data_position(trainer: pl.Trainer | None) -> dict[str, int]:
    """Where the training loader stands: the epoch it is in and the batches of it already trained on.

    A checkpoint written at the end of an epoch points at the start of the next one.
    """
    if trainer is None or not trainer.training:
        return {}
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
    epoch = int(trainer.current_epoch)
    if done >= trainer.num_training_batches:
        return {"epoch": epoch + 1, "batches": 0}
    return {"epoch": epoch, "batches": done}
