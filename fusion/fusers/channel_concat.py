"""Channel concatenation (Prismatic, EAGLE, SPHINX): one grid, encoders side by side in the channels."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fusion.fusers.base import FusedTokens, Fuser
from fusion.fusers.groups import MIXED_GROUP


class ChannelConcatFuser(Fuser):
    """Resample every encoder to one patch grid, concatenate along the channels, project once.

    Each encoder gives ``1 + s*s`` tokens (its summary token, the mean of its prefix tokens, then its
    patch grid resampled to the common ``s x s`` grid: ``sqrt(tokens_per_encoder)`` or the largest
    encoder grid) and is LayerNormed; the ``(B, T, sum D_e)`` channel concatenation goes through one
    Linear to ``(B, T, D)``, plus position embeddings. Output: ``T = 1 + s*s`` mixed tokens.

    VE-dropout drops a whole encoder's channels: zeroed, and the kept encoders' channels rescaled by
    ``n_enc / n_kept`` (dropout's ``1/(1-p)`` rescale). ``encoder_weights`` (B, n_enc): each encoder's
    contribution through the projection, ``||W[:, channels_e] x_e||`` averaged over tokens, normalised
    to sum 1 (dropped encoders 0).
    """

    reports_encoder_weights = True

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        encoder_tokens: Mapping[str, int],
        width: int,
        encoder_prefix: Mapping[str, int] | None = None,
        tokens_per_encoder: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        super().__init__(encoder_dims, encoder_tokens, width, encoder_prefix, tokens_per_encoder)
        self.side = self.common_grid_side()
        self.interpolation = interpolation
        self.norm = nn.ModuleDict({n: nn.LayerNorm(d) for n, d in self.encoder_dims.items()})
        self.proj = nn.Linear(sum(self.encoder_dims.values()), width)
        num_out = 1 + self.side**2
        self.pos_embed = nn.Parameter(torch.zeros(num_out, width))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        offsets = torch.tensor([0, *self.encoder_dims.values()]).cumsum(0).tolist()
        self.channels = {n: (offsets[i], offsets[i + 1]) for i, n in enumerate(self.encoder_names)}
        self.register_buffer("token_encoder", torch.full((num_out,), MIXED_GROUP, dtype=torch.long), persistent=False)

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> FusedTokens:
        """``features[name]`` (B, N_e, D_e), ``keep`` (B, n_enc) bool -> tokens (B, 1 + s*s, D); text unused."""
        self.check_inputs(features, keep)
        scale = len(self.encoder_names) / keep.sum(dim=1)  # (B,): n_enc / n_kept
        parts = []
        for i, name in enumerate(self.encoder_names):
            x = self.norm[name](self.to_common_grid(name, features[name], self.side, self.interpolation))
            start, end = self.channels[name]
            # The projection of the concatenation is the sum of each encoder's channel block's projection;
            # keeping the blocks apart gives the per-encoder contributions for free.
            y = x @ self.proj.weight[:, start:end].T  # (B, T, D)
            kept = keep[:, i, None, None]
            parts.append(torch.where(kept, y * scale[:, None, None].to(y.dtype), torch.zeros_like(y)))
        stacked = torch.stack(parts, dim=1)  # (B, n_enc, T, D)
        tokens = stacked.sum(dim=1) + self.proj.bias + self.pos_embed
        contribution = stacked.detach().float().norm(dim=-1).mean(dim=-1)  # (B, n_enc)
        weights = contribution / contribution.sum(dim=1, keepdim=True).clamp_min(1e-12)
        visible = torch.ones(keep.shape[0], self.num_tokens, dtype=torch.bool, device=keep.device)
        return FusedTokens(tokens, self.token_encoder, visible, weights)
