"""Query resampler (Cambrian-1's spatial vision aggregator, BLIP-2 / BRAVE's query transformer).

A fixed number of learned queries cross-attend to the tokens of all encoders, so the multimodal
transformer sees ``num_queries`` tokens whatever the number of encoders. The cross-attention says how
much each encoder contributes: that mass is the fuser's ``encoder_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fusion.fusers.base import FusedTokens, Fuser
from fusion.fusers.groups import MIXED_GROUP


class EncoderCrossAttention(nn.Module):
    """Multi-head cross-attention from queries ``(B, Q, D)`` to encoder tokens with per-encoder key/value
    projections; returns ``(B, Q, D)`` and the probabilities ``(B, H, Q, N)``.

    The probabilities are computed explicitly rather than in the fused kernel: they are the statistic,
    and with ``Q`` queries the ``(B, H, Q, N)`` tensor is small. Masked keys get probability exactly 0.
    """

    def __init__(self, width: int, num_heads: int, encoder_names: list[str], attn_drop: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"resampler width {width} is not divisible by its num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.ModuleDict({n: nn.Linear(width, 2 * width) for n in encoder_names})
        self.proj = nn.Linear(width, width)
        self.attn_drop = attn_drop

    def forward(
        self, queries: torch.Tensor, memory: Mapping[str, torch.Tensor], key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries`` (B, Q, D); ``memory[name]`` (B, N_e, D) in encoder order; ``key_mask`` (B, N) bool."""
        B, Q, D = queries.shape
        k, v = torch.cat([self.kv[n](m) for n, m in memory.items()], dim=1).chunk(2, dim=-1)  # (B, N, D) each
        q = self.q(queries).reshape(B, Q, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Q, d)
        k = k.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        v = v.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        probs = scores.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(dim=-1)  # (B, H, Q, N)
        out = F.dropout(probs, p=self.attn_drop, training=self.training) @ v
        return self.proj(out.transpose(1, 2).reshape(B, Q, D)), probs


class ResamplerLayer(nn.Module):
    """Pre-norm ``q + xattn(ln(q), memory)`` then ``q + mlp(ln(q))``; queries ``(B, Q, D)`` in and out."""

    def __init__(
        self, width: int, num_heads: int, encoder_names: list[str], mlp_ratio: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = EncoderCrossAttention(width, num_heads, encoder_names, attn_drop=dropout)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def forward(
        self, queries: torch.Tensor, memory: Mapping[str, torch.Tensor], key_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, probs = self.attn(self.norm1(queries), memory, key_mask)
        queries = queries + out
        return queries + self.mlp(self.norm2(queries)), probs


class ResamplerFuser(Fuser):
    """``num_queries`` learned queries cross-attend to all encoders' tokens in ``depth`` layers.

    Each encoder's tokens (average-pooled to ``P_e + K`` with ``tokens_per_encoder``) go through
    LayerNorm + Linear to the width plus that encoder's position embeddings; every layer has its own
    key/value projection per encoder. Dropped encoders are masked out of the cross-attention.
    Output: ``num_queries`` mixed tokens ``(B, Q, D)``. ``encoder_weights`` (B, n_enc): the queries'
    attention mass on each encoder's tokens, averaged over queries, heads and layers.
    """

    reports_encoder_weights = True

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        encoder_tokens: Mapping[str, int],
        width: int,
        encoder_prefix: Mapping[str, int] | None = None,
        tokens_per_encoder: int | None = None,
        num_queries: int = 32,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(encoder_dims, encoder_tokens, width, encoder_prefix, tokens_per_encoder)
        if num_queries < 1 or depth < 1:
            raise ValueError(f"resampler needs num_queries >= 1 and depth >= 1, got {num_queries} and {depth}")
        in_tokens = {n: self.reduced_tokens(n) for n in self.encoder_names}
        self.proj = nn.ModuleDict(
            {n: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for n, d in self.encoder_dims.items()}
        )
        self.pos_embed = nn.ParameterDict({n: nn.Parameter(torch.zeros(t, width)) for n, t in in_tokens.items()})
        self.query_tokens = nn.Parameter(torch.zeros(num_queries, width))
        for p in [self.query_tokens, *self.pos_embed.values()]:
            nn.init.trunc_normal_(p, std=0.02)
        self.layers = nn.ModuleList(
            [ResamplerLayer(width, num_heads, self.encoder_names, mlp_ratio, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        key_encoder = torch.cat([torch.full((t,), i) for i, t in enumerate(in_tokens.values())])
        self.register_buffer("key_encoder", key_encoder, persistent=False)  # (N,) encoder index of each key
        self.register_buffer("token_encoder", torch.full((num_queries,), MIXED_GROUP), persistent=False)

    def no_weight_decay(self) -> set[str]:
        """The positional embeddings and the learned queries are not weight-decayed."""
        return {*super().no_weight_decay(), "query_tokens"}

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> FusedTokens:
        """``features[name]`` (B, N_e, D_e), ``keep`` (B, n_enc) bool -> tokens (B, Q, D); text unused."""
        self.check_inputs(features, keep)
        memory = {n: self.proj[n](self.reduce(n, features[n])) + self.pos_embed[n] for n in self.encoder_names}
        key_mask = keep[:, self.key_encoder]  # (B, N)
        B = keep.shape[0]
        queries = self.query_tokens.expand(B, -1, -1)
        one_hot = F.one_hot(self.key_encoder, len(self.encoder_names)).float()  # (N, n_enc)
        mass = []
        for layer in self.layers:
            queries, probs = layer(queries, memory, key_mask)
            mass.append((probs.detach().float() @ one_hot).mean(dim=(1, 2)))  # (B, n_enc)
        weights = torch.stack(mass).mean(dim=0)
        visible = torch.ones(B, self.num_tokens, dtype=torch.bool, device=keep.device)
        return FusedTokens(self.norm(queries), self.token_encoder, visible, weights)
