"""Metrics shared by the classification tasks (DDP-correct through torchmetrics states)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class AccuracyByType(Metric):
    """Accuracy overall and per answer type.

    ``update(preds, target, types)``: ``preds``/``target`` (B,) class indices, ``types`` (B,) indices into
    ``answer_types``. ``compute()`` returns ``{"": overall, "<type>": accuracy of that type}``; types with
    no example are left out rather than reported as 0.
    """

    full_state_update = False

    def __init__(self, answer_types: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.answer_types = list(answer_types)
        n = max(len(self.answer_types), 1)
        self.add_state("correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, types: torch.Tensor) -> None:
        hit = (preds == target).long()
        self.correct.index_add_(0, types, hit)
        self.total.index_add_(0, types, torch.ones_like(hit))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"": self.correct.sum().float() / self.total.sum().clamp(min=1)}
        for i, name in enumerate(self.answer_types):
            if self.total[i] > 0:
                out[name] = self.correct[i].float() / self.total[i]
        return out
