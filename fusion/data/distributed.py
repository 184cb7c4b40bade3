"""What DDP needs beyond Lightning: rank 0 before the trainer exists, and the prediction rows of all ranks.

Under DDP (``srun`` on SLURM, ``torchrun``) every process runs the whole entry point. Lightning's loggers
and checkpoints already write from global rank 0 only, and the torchmetrics states (task metrics,
attention and fuser statistics) are summed across ranks when computed. What is left:

- files written before the trainer exists (the wandb run id, the resolved config): :func:`is_rank_zero`;
- the prediction file: each rank holds the rows of its own share of the split, so
  :func:`gather_prediction_rows` puts them back together, in the split's order, for rank 0 to write.

Evaluation loaders get an :class:`EvalShardSampler`: rank ``r`` of ``W`` takes examples ``r, r + W, r + 2W,
...`` and nothing more. Lightning's own ``DistributedSampler(shuffle=False)`` pads a split whose size is not a
multiple of ``W`` with its first examples so that every rank gets as many, and the metrics would count those
twice. Ranks may then run one batch fewer than others; nothing in an evaluation step talks across ranks
(torchmetrics states and logged epoch values are reduced once, at the epoch's end, and DDP's forward
synchronises nothing without gradients), so uneven shares are safe there, but not in training.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler


class EvalShardSampler(DistributedSampler):
    """Rank ``r`` of ``W`` takes examples ``r, r + W, r + 2W, ...`` of the split in order, without padding.

    A :class:`DistributedSampler` so that Lightning keeps it instead of putting in its own (padding) one.
    """

    def __init__(self, dataset: Any, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, from the launcher's environment (``RANK``, ``LOCAL_RANK``,
    ``SLURM_PROCID``); usable before the trainer exists. A single process is rank 0."""
    return (getattr(rank_zero_only, "rank", 0) or 0) == 0


def _eval_loader(trainer: pl.Trainer, stage: str) -> DataLoader | None:
    loaders = trainer.test_dataloaders if stage == "test" else trainer.val_dataloaders
    if isinstance(loaders, Sequence):
        loaders = loaders[0] if loaders else None
    return loaders if isinstance(loaders, DataLoader) else None


def interleave(per_rank: Sequence[Sequence[Any]], total: int) -> list[Any]:
    """Rows in the split's order from each rank's rows of an :class:`EvalShardSampler`: rank ``r`` held examples
    ``r, r + W, ...``. A padding ``DistributedSampler``'s repeats (the first examples again, at the end) are cut
    at ``total``."""
    longest = max((len(rows) for rows in per_rank), default=0)
    merged = [rows[i] for i in range(longest) for rows in per_rank if i < len(rows)]
    return merged[:total]


def gather_prediction_rows(trainer: pl.Trainer, stage: str, rows: list[Any]) -> list[Any]:
    """All ranks' prediction rows of this evaluation, in the split's order (every rank must call this).

    In a single process, or when the loader was not split across ranks, ``rows`` as they are.
    """
    if not is_distributed():
        return rows
    loader = _eval_loader(trainer, stage)
    if loader is None or not isinstance(loader.sampler, DistributedSampler):
        return rows  # every rank saw the whole split
    total = len(loader.dataset)
    per_rank: list[list[Any] | None] = [None] * trainer.world_size
    dist.all_gather_object(per_rank, rows)
    return interleave([r or [] for r in per_rank], total)
