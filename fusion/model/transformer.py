"""The multimodal transformer: [CLS] + text tokens + fused visual tokens -> pooled representation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fusion.fusers import FusedTokens, Fuser, TokenConcatFuser
from fusion.fusers.groups import CLS_GROUP, MIXED_GROUP, TEXT_GROUP
from fusion.model.attention import TransformerBlock

__all__ = ["CLS_GROUP", "MIXED_GROUP", "TEXT_GROUP", "FusionModel", "FusionOutput"]


@dataclass
class FusionOutput:
    """What one forward pass of :class:`FusionModel` gives.

    ``pooled`` (B, D): the final [CLS] state; ``hidden`` (B, S, D); ``attentions``: one (B, H, S, S)
    tensor per layer when requested, else None; ``key_groups`` (S,): -2 [CLS], -1 text, -3 a token
    mixing encoders, else the encoder index; ``key_mask`` (B, S) bool visibility; ``text_query_mask``
    (B, S) bool, True at real text tokens; ``encoder_weights`` (B, n_enc) the fuser's own per-sample
    share of each encoder, or None (token_concat: the attention statistics tell).
    """

    pooled: torch.Tensor
    hidden: torch.Tensor
    attentions: list[torch.Tensor] | None
    key_groups: torch.Tensor
    key_mask: torch.Tensor
    text_query_mask: torch.Tensor
    encoder_weights: torch.Tensor | None = None


class FusionModel(nn.Module):
    """Fuses text with the tokens of several vision encoders in one transformer.

    Sequence layout: ``[CLS] + text (L) + visual (N)``; the visual tokens come from ``fuser`` (see
    :mod:`fusion.fusers`), which also gets the projected text. Dropped encoders are removed through the
    key mask (token_concat: their tokens are invisible to every query) or inside the fuser (fusers
    that mix encoders). ``encoder_prefix`` (default 1 per encoder) and ``tokens_per_encoder`` (token
    reduction to a ``sqrt(K) x sqrt(K)`` grid per encoder) are passed on to the fuser.

    With ``num_images`` I > 1 (NLVR2 shows two), every image goes through the fuser on its own, each
    image's tokens get a learned image-index embedding, and the visual part is the images' tokens side by
    side; a dropped encoder is dropped from every image of the sample.
    """

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        encoder_tokens: Mapping[str, int],
        text_dim: int,
        width: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        attention_score: str = "scaled_dot",
        fuser: Callable[..., Fuser] = TokenConcatFuser,
        encoder_prefix: Mapping[str, int] | None = None,
        tokens_per_encoder: int | None = None,
        num_images: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        self.encoder_names = list(encoder_dims)
        self.num_images = num_images
        self.width, self.depth, self.num_heads = width, depth, num_heads
        self.fuser = fuser(
            encoder_dims=encoder_dims,
            encoder_tokens=encoder_tokens,
            width=width,
            encoder_prefix=encoder_prefix,
            tokens_per_encoder=tokens_per_encoder,
        )
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.text_type = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.text_type, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if num_images > 1:
            self.image_embed = nn.Parameter(torch.zeros(num_images, width))
            nn.init.trunc_normal_(self.image_embed, std=0.02)
        self.blocks = nn.ModuleList(
            [TransformerBlock(width, num_heads, mlp_ratio, dropout, score=attention_score) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to this module) left out of weight decay: [CLS], the text-type embedding and
        the image-index embedding (timm's ViT likewise exempts ``cls_token`` and ``pos_embed``); the fuser lists
        its own."""
        return {"cls_token", "text_type", "image_embed"}

    @property
    def mixes_encoders(self) -> bool:
        """True if the fuser outputs tokens that mix encoders (``MIXED_GROUP`` in ``key_groups``)."""
        return self.fuser.mixes_encoders

    @property
    def reports_encoder_weights(self) -> bool:
        """True if ``FusionOutput.encoder_weights`` is set (the fuser measures each encoder's share)."""
        return bool(getattr(self.fuser, "reports_encoder_weights", False))

    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> FusionOutput:
        """``features[name]`` (B, N_e, D_e), or (B, I, N_e, D_e) with ``num_images`` I > 1; ``keep`` (B, n_enc)
        bool; ``text_hidden`` (B, L, D_t); ``text_mask`` (B, L) bool, True at real tokens."""
        B, L = text_mask.shape
        text_mask = text_mask.bool()
        visual, text = self.visual_tokens(features, keep, text_hidden, text_mask)
        x = torch.cat([self.cls_token.expand(B, -1, -1), text, visual.tokens], dim=1)
        ones = torch.ones(B, 1, dtype=torch.bool, device=x.device)
        key_mask = torch.cat([ones, text_mask, visual.visible], dim=1)
        key_groups = torch.cat(
            [
                torch.tensor([CLS_GROUP], device=x.device),
                torch.full((L,), TEXT_GROUP, device=x.device),
                visual.token_encoder.to(x.device),
            ]
        )
        text_query_mask = torch.cat([~ones, text_mask, torch.zeros_like(visual.visible)], dim=1)
        attentions = [] if output_attentions else None
        for block in self.blocks:
            x, probs = block(x, key_mask, need_weights=output_attentions)
            if attentions is not None:
                attentions.append(probs)
        x = self.norm(x)
        return FusionOutput(x[:, 0], x, attentions, key_groups, key_mask, text_query_mask, visual.encoder_weights)

    def visual_tokens(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text_hidden: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> tuple[FusedTokens, torch.Tensor]:
        """The fuser's visual tokens (with the image-index embedding when ``num_images`` > 1) and the projected
        text ``(B, L, width)`` the fuser was conditioned on; the part of :meth:`forward` before the transformer,
        which is all the LM head (:mod:`fusion.model.lm`) reads. Shapes as in :meth:`forward`."""
        text_mask = text_mask.bool()
        text = self.text_proj(text_hidden) + self.text_type
        if self.num_images == 1:
            return self.fuser(features, keep, text, text_mask), text
        return self._fuse_images(features, keep, text, text_mask), text

    def _fuse_images(
        self, features: Mapping[str, torch.Tensor], keep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
    ) -> FusedTokens:
        """Fuse each of the I images on its own (one fuser call over B*I rows) and lay them side by side.

        ``features[name]`` (B, I, N_e, D_e) -> tokens (B, I*N, D), image i's tokens plus ``image_embed[i]``.
        """
        n_img = self.num_images
        for name, f in features.items():
            if f.dim() != 4 or f.shape[1] != n_img:
                raise ValueError(
                    f"features of encoder {name!r} should be (B, {n_img}, N, D) for {n_img} images per example, "
                    f"got {tuple(f.shape)}"
                )
        flat = {name: f.flatten(0, 1) for name, f in features.items()}
        B = keep.shape[0]
        fused = self.fuser(
            flat,
            keep.repeat_interleave(n_img, 0),
            text.repeat_interleave(n_img, 0),
            text_mask.repeat_interleave(n_img, 0),
        )
        tokens = fused.tokens.unflatten(0, (B, n_img)) + self.image_embed[None, :, None, :]
        weights = fused.encoder_weights
        return FusedTokens(
            tokens=tokens.flatten(1, 2),
            token_encoder=fused.token_encoder.repeat(n_img),
            visible=fused.visible.unflatten(0, (B, n_img)).flatten(1, 2),
            # The sample's share of each encoder: the mean over its images.
            encoder_weights=None if weights is None else weights.unflatten(0, (B, n_img)).mean(1),
        )
