"""Token concatenation: every encoder's tokens, projected, side by side in one sequence."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.fusers.base import FusedTokens, Fuser


class TokenConcatFuser(Fuser):
    """Project each encoder's tokens to the shared width and concatenate them along the sequence.

    Each encoder's tokens ``(B, N_e, D_e)`` (average-pooled to ``P_e + K`` with ``tokens_per_encoder``)
    go through LayerNorm + Linear to ``(B, N_e, D)`` and get a learned encoder-type embedding and that
    encoder's own position embeddings. Encoders are concatenated in the order of ``encoder_dims``;
    a dropped encoder's tokens are hidden through ``visible``.
    """

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        encoder_tokens: Mapping[str, int],
        width: int,
        encoder_prefix: Mapping[str, int] | None = None,
        tokens_per_encoder: int | None = None,
    ) -> None:
        super().__init__(encoder_dims, encoder_tokens, width, encoder_prefix, tokens_per_encoder)
        out_tokens = {n: self.reduced_tokens(n) for n in self.encoder_names}
        self.proj = nn.ModuleDict(
            {n: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for n, d in self.encoder_dims.items()}
        )
        self.type_embed = nn.Parameter(torch.zeros(len(self.encoder_names), width))
        self.pos_embed = nn.ParameterDict({n: nn.Parameter(torch.zeros(t, width)) for n, t in out_tokens.items()})
        for p in [self.type_embed, *self.pos_embed.values()]:
            nn.init.trunc_normal_(p, std=0.02)
        token_encoder = torch.cat(
            [torch.full((out_tokens[n],), i, dtype=torch.long) for i, n in enumerate(self.encoder_names)]
        )
        self.register_buffer("token_encoder", token_encoder, persistent=False)

    def no_weight_decay(self) -> set[str]:
        """The positional embeddings and the encoder-type embedding are not weight-decayed."""
        return {*super().no_weight_decay(), "type_embed"}

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> FusedTokens:
        """``features[name]`` (B, N_e, D_e), ``keep`` (B, n_enc) bool -> tokens (B, N, D); text unused."""
        self.check_inputs(features, keep)
        tokens = []
        for i, name in enumerate(self.encoder_names):
            x = self.proj[name](self.reduce(name, features[name]))
            tokens.append(x + self.type_embed[i] + self.pos_embed[name])
        visible = keep[:, self.token_encoder]  # (B, N): a token is visible iff its encoder is kept
        return FusedTokens(torch.cat(tokens, dim=1), self.token_encoder, visible)
