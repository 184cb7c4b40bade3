"""The fuser's own per-encoder weights, averaged over an evaluation set, and their files.

Fusers that mix encoders report ``encoder_weights`` ``(B, n_enc)`` (channel_concat: contribution
through the projection; resampler: cross-attention mass; gated: gate values). :class:`FuserWeights`
averages them over samples; :func:`save_fuser_weights` writes ``fuser_weights.json`` and a bar chart
``fuser_weights.png`` next to the attention statistics.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from fusion.io import atomic_write, save_figure

__all__ = ["FuserWeights", "fuser_scalars", "load_fuser_weights", "save_fuser_weights"]

JSON_NAME = "fuser_weights.json"
PNG_NAME = "fuser_weights.png"


class FuserWeights(Metric):
    """Mean over samples of the fuser's ``encoder_weights``: ``update((B, n_enc))``, ``compute() -> (n_enc,)``.

    Sum states, so DDP ranks reduce to the mean over all their samples; zeros before any update.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    weight_sum: Tensor
    count: Tensor

    def __init__(self, encoder_names: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.encoder_names = list(encoder_names)
        if not self.encoder_names or len(set(self.encoder_names)) != len(self.encoder_names):
            raise ValueError(f"encoder names must be unique and non-empty, got {self.encoder_names}")
        n = len(self.encoder_names)
        self.add_state("weight_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, encoder_weights: Tensor) -> None:
        """``encoder_weights`` (B, n_enc), any float dtype."""
        n = len(self.encoder_names)
        if encoder_weights.dim() != 2 or encoder_weights.shape[1] != n:
            raise ValueError(
                f"expected encoder_weights of shape (B, {n}) for {self.encoder_names}, "
                f"got {tuple(encoder_weights.shape)}"
            )
        self.weight_sum += encoder_weights.detach().sum(dim=0).to(self.weight_sum)
        self.count += encoder_weights.shape[0]

    def compute(self) -> Tensor:
        """``(n_enc,)`` float32 mean weights."""
        return (self.weight_sum / self.count.clamp(min=1)).to(torch.float32)


def fuser_scalars(weights: Tensor, encoder_names: Sequence[str], prefix: str = "fuser") -> dict[str, float]:
    """``{prefix}/{encoder}`` -> mean weight."""
    return {f"{prefix}/{name}": float(w) for name, w in zip(encoder_names, weights.tolist(), strict=True)}


def plot_fuser_weights(weights: Tensor, encoder_names: Sequence[str], path: Path) -> Path:
    """Bar chart of the mean weight of each encoder, written atomically to ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global figure registry in a training process

    values = weights.detach().float().cpu().tolist()
    fig = Figure(figsize=(1.5 + 0.9 * len(values), 3.2))
    ax = fig.add_subplot()
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(values)), list(encoder_names), rotation=45, ha="right")
    ax.set_ylim(0.0, max(1.0, max(values) * 1.1))
    ax.set_ylabel("mean fuser weight")
    ax.set_title("Fuser weight per encoder")
    save_figure(fig, path, dpi=100)
    return path


def save_fuser_weights(
    weights: Tensor, encoder_names: Sequence[str], out_dir: Path, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``fuser_weights.json`` (``{"encoders": [...], "weights": [...], **extra}``) and the bar chart
    ``fuser_weights.png`` to ``out_dir``; returns file name -> path."""
    if weights.shape != (len(encoder_names),):
        raise ValueError(f"expected weights of shape ({len(encoder_names)},), got {tuple(weights.shape)}")
    payload: dict[str, Any] = {"encoders": list(encoder_names), "weights": weights.detach().float().cpu().tolist()}
    clash = sorted(set(extra or {}) & set(payload))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the weights in {JSON_NAME}")
    payload.update(extra or {})
    json_bytes = (json.dumps(payload, indent=1) + "\n").encode()  # before touching the disk
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {JSON_NAME: out_dir / JSON_NAME}
    atomic_write(paths[JSON_NAME], lambda f: f.write(json_bytes))
    paths[PNG_NAME] = plot_fuser_weights(weights, encoder_names, out_dir / PNG_NAME)
    return paths


def load_fuser_weights(path: Path | str) -> tuple[Tensor, list[str]]:
    """Read ``fuser_weights.json`` (or the folder holding it) back as ``(weights (n_enc,), encoder_names)``."""
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    payload = json.loads(path.read_text())
    return torch.tensor(payload["weights"], dtype=torch.float32), list(payload["encoders"])
