"""``zoo/vit_tiny``: supervised pretraining, as the ImageNet-21k ViTs are, on the generated attributes.

One linear head per label group on the pooled [CLS] feature; every group is multi-hot (which shapes and
which colours the scene holds; for an image folder, the one-hot folder class) and trained with binary
cross-entropy, as multi-label ImageNet-21k training does. The head is dropped when the tower is saved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multilabel_exact_match

from fusion.encoders.vision import TimmEncoder
from fusion.zoo.recipe import ZooRecipe

__all__ = ["SupervisedRecipe"]


class SupervisedRecipe(ZooRecipe):
    """Multi-label classification of ``label_groups`` (read from the data module in :meth:`setup`).

    Images go through the encoder's own eval preprocessing plus horizontal flips (labels are presence
    only, so a flip keeps them). Logs the exact-match accuracy of each group as ``<stage>/exact_<group>``.
    """

    needs = ("classes",)

    def __init__(
        self,
        encoder: TimmEncoder,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_ratio: float = 0.1,
        label_groups: dict[str, int] | None = None,
    ) -> None:
        super().__init__(encoder, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
        self._eval_transform = self.preprocess.transform()
        self.heads = nn.ModuleDict()
        if label_groups:
            self._build_heads(dict(label_groups))

    def _build_heads(self, label_groups: dict[str, int]) -> None:
        if not label_groups:
            raise ValueError("supervised recipe: the data provides no label groups to classify")
        for group, n in label_groups.items():
            self.heads[group] = nn.Linear(self.embed_dim, n)

    def setup(self, stage: str) -> None:
        # The heads' sizes depend on the data (scenes: shape 3 + colour 5; a folder: its classes), which
        # Lightning makes available here, before the optimiser is built.
        if len(self.heads) == 0:
            self._build_heads(dict(self.trainer.datamodule.label_groups))

    def transform(self, item: dict[str, Any]) -> dict[str, Any]:
        pixels = self._eval_transform(item["image"])
        if torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {"pixels": pixels, "targets": item["targets"]}

    def logits(self, pixels: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> {group: (B, classes)}."""
        pooled = self.pooled(pixels)
        return {group: head(pooled) for group, head in self.heads.items()}

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.logits(batch["pixels"])
        targets = batch["targets"]
        missing = set(logits) - set(targets)
        if missing:
            raise KeyError(f"supervised recipe: batch has no targets for label group(s) {sorted(missing)}")
        losses = [F.binary_cross_entropy_with_logits(out, targets[g].float()) for g, out in logits.items()]
        logs = {}
        if not self.training:
            for group, out in logits.items():
                n = out.shape[-1]
                logs[f"exact_{group}"] = multilabel_exact_match(out, targets[group], num_labels=n)
        return torch.stack(losses).mean(), logs
