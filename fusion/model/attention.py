"""Multi-head self-attention with a configurable score function; probabilities can be read out on request.

Score functions follow Cao et al. (COLING 2022), "Understanding Attention for Vision-and-Language Tasks".
Each maps per-head queries and keys ``(B, H, Q, d)``, ``(B, H, K, d)`` to unnormalised scores
``(B, H, Q, K)``; masking, softmax, dropout and the probability read-out are shared by all of them.
Scores that are a dot product of (transformed) queries and keys also have a ``prepare`` form so that
the fused ``F.scaled_dot_product_attention`` kernel can run them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_SCORES = ("dot", "scaled_dot", "general", "biased_general", "activated_general", "additive", "cosine")


class AttentionScore(nn.Module):
    """Maps q ``(B, H, Q, d)`` and k ``(B, H, K, d)`` to scores ``(B, H, Q, K)``.

    ``fused`` is True when ``prepare(q, k) -> (q', k', scale)`` gives ``scores = scale * q' k'^T``,
    i.e. the score can run inside ``F.scaled_dot_product_attention``.
    """

    fused: bool = False

    def prepare(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise TypeError(f"{type(self).__name__} is not a dot-product score: it has no fused form")

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k, scale = self.prepare(q, k)
        return (q @ k.transpose(-2, -1)) * scale


class DotScore(AttentionScore):
    """``scale * q k^T``: ``dot`` (scale 1) and ``scaled_dot`` (scale ``1/sqrt(d)``)."""

    fused = True

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def prepare(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        return q, k, self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}"


class BilinearScore(AttentionScore):
    """``general``: ``q W k^T``; ``biased_general``: ``(q W + b) k^T``; ``activated_general``: ``tanh`` of that.

    ``W`` (H, d, d) starts at ``I / sqrt(d)`` so training starts from ``scaled_dot``. The bias ``b`` (H, d)
    sits on the query side, adding ``b . k`` (a learned per-head prior over keys): a bias that only
    depends on the query, like ``q . b`` from ``q (W k + b)``, shifts a whole softmax row and would have
    no effect (and zero gradient). Without tanh the score is a dot product of ``q W + b`` and ``k``, so it
    runs in the fused kernel; ``tanh`` bounds scores to [-1, 1], which caps how peaked attention can get.
    """

    def __init__(self, num_heads: int, head_dim: int, bias: bool = False, activation: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1) * head_dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim)) if bias else None
        self.activation = activation
        self.fused = not activation

    def prepare(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        qw = q @ self.weight  # (B, H, Q, d) @ (H, d, d)
        if self.bias is not None:
            qw = qw + self.bias[:, None, :]
        return qw, k, 1.0

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scores = super().forward(q, k)
        return torch.tanh(scores) if self.activation else scores


class AdditiveScore(AttentionScore):
    """``additive``: ``v^T tanh(W q + U k)`` per head, ``W``, ``U`` (H, d, d_a), ``v`` (H, d_a).

    Memory-heavy: the tanh runs on a ``(B, H, Q, K, d_a)`` tensor, so ``d_a`` defaults to ``d``. Above
    ``max_chunk_elements`` queries are processed in chunks and, when gradients are needed, each chunk
    is recomputed in the backward pass (activation checkpointing) instead of being stored, which keeps
    peak memory near one chunk at the price of a second forward of the pairwise part.
    """

    def __init__(
        self, num_heads: int, head_dim: int, attn_dim: int | None = None, max_chunk_elements: int = 2**26
    ) -> None:
        super().__init__()
        attn_dim = attn_dim or head_dim
        self.w_q = nn.Parameter(torch.randn(num_heads, head_dim, attn_dim) * head_dim**-0.5)
        self.w_k = nn.Parameter(torch.randn(num_heads, head_dim, attn_dim) * head_dim**-0.5)
        self.v = nn.Parameter(torch.randn(num_heads, attn_dim) * attn_dim**-0.5)
        self.max_chunk_elements = max_chunk_elements

    @staticmethod
    def _pair_scores(wq: torch.Tensor, uk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``wq`` (B, H, Q, A), ``uk`` (B, H, 1, K, A), ``v`` (H, A) -> (B, H, Q, K)."""
        hidden = torch.add(wq.unsqueeze(3), uk).tanh_()  # (B, H, Q, K, A); in place saves one such tensor
        return (hidden @ v[:, None, :, None]).squeeze(-1)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        wq = q @ self.w_q  # (B, H, Q, A)
        uk = (k @ self.w_k).unsqueeze(2)  # (B, H, 1, K, A)
        B, H, Q, A = wq.shape
        rows = max(1, self.max_chunk_elements // (B * H * uk.shape[3] * A))
        if rows >= Q:
            return self._pair_scores(wq, uk, self.v)
        recompute = torch.is_grad_enabled()
        chunks = []
        for start in range(0, Q, rows):
            wq_chunk = wq[:, :, start : start + rows]
            if recompute:
                chunks.append(
                    checkpoint(self._pair_scores, wq_chunk, uk, self.v, use_reentrant=False, preserve_rng_state=False)
                )
            else:
                chunks.append(self._pair_scores(wq_chunk, uk, self.v))
        return torch.cat(chunks, dim=2)


class CosineScore(AttentionScore):
    """``cosine``: ``cos(q, k) / tau`` with a learned per-head temperature.

    Stored as ``log_scale = -log(tau)`` (H,), initialised to ``log(sqrt(d))``: for random q, k the
    scores then have the same spread as ``scaled_dot``. Clamped at ``log(max_scale)`` (as in Swin V2)
    so a head cannot collapse onto one key. The parameter is 1-d, so it stays out of weight decay.
    Fused by normalising q and k and scaling q by ``1/tau`` (SDPA's ``scale`` must be a Python float).
    """

    fused = True

    def __init__(self, num_heads: int, head_dim: int, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((num_heads,), 0.5 * math.log(head_dim)))
        self.max_log_scale = math.log(max_scale)

    @property
    def temperature(self) -> torch.Tensor:
        """``tau`` per head, (H,)."""
        return self.log_scale.clamp(max=self.max_log_scale).neg().exp()

    def prepare(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        inv_tau = self.log_scale.clamp(max=self.max_log_scale).exp()[:, None, None]  # (H, 1, 1)
        return F.normalize(q, dim=-1) * inv_tau, F.normalize(k, dim=-1), 1.0


def build_score(name: str, num_heads: int, head_dim: int) -> AttentionScore:
    """The score module called ``name`` (one of :data:`ATTENTION_SCORES`)."""
    if name == "dot":
        return DotScore(1.0)
    if name == "scaled_dot":
        return DotScore(head_dim**-0.5)
    if name in ("general", "biased_general", "activated_general"):
        return BilinearScore(num_heads, head_dim, bias=name != "general", activation=name == "activated_general")
    if name == "additive":
        return AdditiveScore(num_heads, head_dim)
    if name == "cosine":
        return CosineScore(num_heads, head_dim)
    raise ValueError(f"unknown attention score {name!r}; allowed: {', '.join(ATTENTION_SCORES)}")


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over a sequence ``(B, S, D)`` with a key visibility mask ``(B, S)``.

    ``score`` is one of :data:`ATTENTION_SCORES`. With ``need_weights=False`` scores that have a fused
    form (``dot``, ``scaled_dot``, ``general``, ``biased_general``, ``cosine``) run in the fused
    ``F.scaled_dot_product_attention`` kernel; otherwise the scores are computed explicitly, and with
    ``need_weights=True`` the probabilities ``(B, H, S, S)`` are returned too. Masked keys
    (``key_mask`` False) get probability exactly 0.
    """

    def __init__(
        self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, score: str = "scaled_dot"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.score = build_score(score, num_heads, self.head_dim)
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
        if need_weights or not self.score.fused:
            scores = self.score(q, k).masked_fill(~mask, float("-inf"))  # (B, H, S, S)
            attn = scores.softmax(dim=-1)
            out = F.dropout(attn, p=drop, training=self.training) @ v
            probs = attn if need_weights else None
        else:
            q, k, scale = self.score.prepare(q, k)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=scale)
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
