"""Task heads: read the fused [CLS] representation and predict."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """MLP classifier over answers, as VQA heads do: ``(B, D) -> (B, num_classes)``."""

    def __init__(self, width: int, num_classes: int, hidden_mult: float = 2.0, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = int(width * hidden_mult)
        self.net = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)
