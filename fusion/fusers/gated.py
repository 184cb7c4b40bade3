"""Text-gated mixture of encoders (MoVA-style): the question decides how much each encoder counts."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.fusers.base import FusedTokens, Fuser
from fusion.fusers.groups import MIXED_GROUP


class GatedFuser(Fuser):
    """Gate-weighted sum of the encoders' tokens on one common grid, the gate conditioned on the text.

    Each encoder gives ``1 + s*s`` tokens (its summary token, the mean of its prefix tokens, then its
    patch grid resampled to the common ``s x s`` grid: ``sqrt(tokens_per_encoder)`` or the largest
    encoder grid), projected by LayerNorm + Linear to ``(B, 1 + s*s, D)``. The gate is a softmax over
    the kept encoders of ``mlp([mean text ; mean encoder tokens])``; the output is the gate-weighted
    sum over encoders plus position embeddings, ``(B, 1 + s*s, D)`` mixed tokens. The gate values are
    the ``encoder_weights`` (B, n_enc); a dropped encoder gets gate 0.
    """

    reports_encoder_weights = True
    uses_text = True

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        encoder_tokens: Mapping[str, int],
        width: int,
        encoder_prefix: Mapping[str, int] | None = None,
        tokens_per_encoder: int | None = None,
        gate_hidden_mult: float = 1.0,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__(encoder_dims, encoder_tokens, width, encoder_prefix, tokens_per_encoder)
        self.side = self.common_grid_side()
        self.interpolation = interpolation
        self.proj = nn.ModuleDict(
            {n: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for n, d in self.encoder_dims.items()}
        )
        hidden = int(width * gate_hidden_mult)
        self.gate = nn.Sequential(
            nn.LayerNorm(2 * width), nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )
        num_out = 1 + self.side**2
        self.pos_embed = nn.Parameter(torch.zeros(num_out, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.register_buffer("token_encoder", torch.full((num_out,), MIXED_GROUP), persistent=False)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> FusedTokens:
        """``features[name]`` (B, N_e, D_e), ``keep`` (B, n_enc) bool, ``text`` (B, L, D), ``text_mask`` (B, L)
        bool -> tokens (B, 1 + s*s, D)."""
        self.check_inputs(features, keep)
        if text is None or text_mask is None:
            raise ValueError("GatedFuser conditions its gate on the text: pass text (B, L, D) and text_mask (B, L)")
        weights = text_mask.to(text.dtype).unsqueeze(-1)  # (B, L, 1)
        text_pooled = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)  # (B, D); no text -> 0
        stacked = torch.stack(
            [
                self.proj[n](self.to_common_grid(n, features[n], self.side, self.interpolation))
                for n in self.encoder_names
            ],
            dim=1,
        )  # (B, n_enc, T, D)
        encoder_pooled = stacked.mean(dim=2)  # (B, n_enc, D)
        gate_in = torch.cat([text_pooled.unsqueeze(1).expand_as(encoder_pooled), encoder_pooled], dim=-1)
        logits = self.gate(gate_in).squeeze(-1).float()  # (B, n_enc)
        gate = logits.masked_fill(~keep, float("-inf")).softmax(dim=1)
        # where, not just gate 0: a dropped encoder must not reach the output even through inf/nan features.
        contrib = torch.where(keep[:, :, None, None], stacked * gate[:, :, None, None].to(stacked.dtype), 0.0)
        tokens = contrib.sum(dim=1) + self.pos_embed
        visible = torch.ones(keep.shape[0], self.num_tokens, dtype=torch.bool, device=keep.device)
        return FusedTokens(tokens, self.token_encoder, visible, gate.detach())
