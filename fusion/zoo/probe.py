"""What a zoo tower learned: linear probes on frozen [CLS] features, and linear CKA between towers.

Probes follow the usual protocol (CLIP, DINO): features of a frozen tower, standardised, and a linear
classifier fitted with L-BFGS on one set of generated scenes and scored on another. Multi-hot groups
(``shape``, ``color``: which are present) are scored by exact match, the others by accuracy over the
image (``count``) or over every grid cell (``cell_color``, ``cell_shape``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_accuracy, multilabel_exact_match

from fusion.counter import progress_counter
from fusion.encoders.vision import VisionEncoder
from fusion.zoo.scenes import ATTRIBUTE_GROUPS, MULTI_HOT, SceneDataset

__all__ = ["cls_features", "linear_cka", "linear_probe", "probe_encoders", "scene_targets"]


@torch.no_grad()
def cls_features(encoder: VisionEncoder, dataset: SceneDataset, batch_size: int = 256) -> Tensor:
    """The encoder's [CLS] token (final normed features) for every scene: (N, D)."""
    transform = encoder.preprocess.transform()
    loader = DataLoader(
        range(len(dataset)),
        batch_size=batch_size,
        collate_fn=lambda idx: torch.stack([transform(dataset[i]["image"]) for i in idx]),
    )
    batches = progress_counter(loader, desc=f"features {encoder.name}", leave=False)
    chunks = [encoder(pixels)[:, 0] for pixels in batches]
    return torch.cat(chunks)


def scene_targets(dataset: SceneDataset) -> dict[str, Tensor]:
    """Every attribute group's targets for every scene: {group: (N, ...)}."""
    rows = [dataset[i]["targets"] for i in range(len(dataset))]
    return {group: torch.stack([r[group] for r in rows]) for group in ATTRIBUTE_GROUPS}


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, group: str, l2: float = 1e-3, steps: int = 200
) -> float:
    """Fit a linear classifier for attribute ``group`` on (N, D) features; its test score in [0, 1].

    Targets: multi-hot groups (N, C) of 0/1; ``count`` (N,) class indices; per-cell groups (N, cells).
    """
    if group not in ATTRIBUTE_GROUPS:
        raise ValueError(f"unknown attribute group {group!r}; known: {list(ATTRIBUTE_GROUPS)}")
    num_classes = ATTRIBUTE_GROUPS[group]
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    # One linear map to every output: C labels, C classes, or C classes for each of the cells.
    outputs = num_classes * (train_y.shape[1] if train_y.ndim == 2 and group not in MULTI_HOT else 1)
    layer = torch.nn.Linear(train_x.shape[1], outputs)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        logits = layer(x)
        if group in MULTI_HOT:
            return F.binary_cross_entropy_with_logits(logits, y.float())
        return F.cross_entropy(logits.view(len(x), num_classes, -1).squeeze(-1), y)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_of(train_x, train_y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = layer(test_x)
    if group in MULTI_HOT:
        return float(multilabel_exact_match(logits, test_y, num_labels=num_classes))
    logits = logits.view(len(test_x), num_classes, -1).squeeze(-1)
    return float(multiclass_accuracy(logits, test_y, num_classes=num_classes, average="micro"))


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of (N, D1) and (N, D2) features of the same N inputs, in [0, 1]."""
    if len(x) != len(y):
        raise ValueError(f"CKA compares features of the same inputs; got {len(x)} and {len(y)} rows")
    x = (x - x.mean(0)).double()
    y = (y - y.mean(0)).double()
    cross = (y.t() @ x).pow(2).sum()
    return float(cross / ((x.t() @ x).norm() * (y.t() @ y).norm()))


def probe_encoders(
    encoders: Mapping[str, VisionEncoder],
    groups: Sequence[str] = tuple(ATTRIBUTE_GROUPS),
    num_train: int = 2000,
    num_test: int = 500,
    seed: int = 1000,
) -> dict[str, dict]:
    """Probe scores ``{"probe": {encoder: {group: score}}, "cka": {"a|b": cka}}`` on fresh generated scenes.

    The scenes come from streams ``seed`` (fit) and ``seed + 1`` (score), separate from the recipes'
    training (``seed`` 0) and validation (1) streams.
    """
    train_set, test_set = SceneDataset(num_train, seed=seed), SceneDataset(num_test, seed=seed + 1)
    train_y, test_y = scene_targets(train_set), scene_targets(test_set)
    probe: dict[str, dict[str, float]] = {}
    test_features: dict[str, Tensor] = {}
    for name, encoder in encoders.items():
        train_x, test_x = cls_features(encoder, train_set), cls_features(encoder, test_set)
        test_features[name] = test_x
        probe[name] = {g: linear_probe(train_x, train_y[g], test_x, test_y[g], g) for g in groups}
    names = list(encoders)
    cka = {
        f"{a}|{b}": linear_cka(test_features[a], test_features[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return {"probe": probe, "cka": cka}
