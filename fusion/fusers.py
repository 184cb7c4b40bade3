"""Fusers: turn several encoders' token features into one sequence of visual tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class FusedTokens:
    """Visual tokens of all encoders and which encoder each one came from.

    ``tokens`` (B, N, D); ``token_encoder`` (N,) long, the index of the source encoder;
    ``visible`` (B, N) bool, False where the token's encoder is dropped for that sample.
    """

    tokens: torch.Tensor
    token_encoder: torch.Tensor
    visible: torch.Tensor


class TokenConcatFuser(nn.Module):
    """Project each encoder's tokens to the shared width and concatenate them along the sequence.

    Each encoder's tokens ``(B, N_e, D_e)`` go through LayerNorm + Linear to ``(B, N_e, D)`` and get
    a learned encoder-type embedding and that encoder's own position embeddings. Encoders are
    concatenated in the order of ``encoder_dims``.
    """

    def __init__(self, encoder_dims: Mapping[str, int], encoder_tokens: Mapping[str, int], width: int) -> None:
        super().__init__()
        self.encoder_names = list(encoder_dims)
        if list(encoder_tokens) != self.encoder_names:
            raise ValueError(f"encoder_tokens keys {list(encoder_tokens)} differ from {self.encoder_names}")
        self.proj = nn.ModuleDict(
            {n: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, width)) for n, d in encoder_dims.items()}
        )
        self.type_embed = nn.Parameter(torch.zeros(len(self.encoder_names), width))
        self.pos_embed = nn.ParameterDict(
            {n: nn.Parameter(torch.zeros(t, width)) for n, t in encoder_tokens.items()}
        )
        for p in [self.type_embed, *self.pos_embed.values()]:
            nn.init.trunc_normal_(p, std=0.02)
        token_encoder = torch.cat(
            [torch.full((encoder_tokens[n],), i, dtype=torch.long) for i, n in enumerate(self.encoder_names)]
        )
        self.register_buffer("token_encoder", token_encoder, persistent=False)

    def forward(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor) -> FusedTokens:
        """``features[name]`` (B, N_e, D_e) for every encoder; ``keep`` (B, n_encoders) bool."""
        missing = [n for n in self.encoder_names if n not in features]
        if missing:
            raise KeyError(f"features missing for encoders {missing}; got {list(features)}")
        tokens = []
        for i, name in enumerate(self.encoder_names):
            x = self.proj[name](features[name])
            tokens.append(x + self.type_embed[i] + self.pos_embed[name])
        visible = keep[:, self.token_encoder]  # (B, N): a token is visible iff its encoder is kept
        return FusedTokens(torch.cat(tokens, dim=1), self.token_encoder, visible)
