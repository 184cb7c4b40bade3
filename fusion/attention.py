"""Multi-head self-attention whose probabilities can be read out on request."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over a sequence ``(B, S, D)`` with a key visibility mask ``(B, S)``.

    With ``need_weights=False`` it runs the fused ``F.scaled_dot_product_attention`` kernel; with
    ``need_weights=True`` it computes the same scores explicitly and also returns the attention
    probabilities ``(B, H, S, S)``. Masked keys (``key_mask`` False) get probability exactly 0.
    """

    def __init__(
        self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, score: str = "scaled_dot"
    ) -> None:
        super().__init__()
        if score != "scaled_dot":
            raise ValueError(f"attention score {score!r} is not available; allowed: ['scaled_dot']")
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, S, D), ``key_mask`` (B, S) bool, True = visible. Returns ``(B, S, D)``, probs or None."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).reshape(B, S, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S): broadcast over heads and queries
        drop = self.attn_drop if self.training else 0.0
        probs = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * self.scale
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            out = F.dropout(probs, p=drop, training=self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        out = out.transpose(1, 2).reshape(B, S, D)
        return self.proj_drop(self.proj(out)), probs


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``; ``(B, S, D)`` in and out."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, score: str = "scaled_dot"
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, attn_drop=dropout, proj_drop=dropout, score=score)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn_out, probs = self.attn(self.norm1(x), key_mask, need_weights)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, probs
