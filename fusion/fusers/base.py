"""The interface every fuser implements: encoder features + keep mask in, :class:`FusedTokens` out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fusion.encoders.grid import patch_grid_side, pool_tokens, pooled_grid_side, resample_grid, summary_token
from fusion.fusers.groups import MIXED_GROUP


@dataclass
class FusedTokens:
    """Visual tokens of all encoders and which encoder each one came from.

    ``tokens`` (B, N, D); ``token_encoder`` (N,) long, the index of the source encoder or
    :data:`MIXED_GROUP`; ``visible`` (B, N) bool, False where the token's encoder is dropped for that
    sample (mixed tokens are always visible: the fuser drops encoders inside them);
    ``encoder_weights`` (B, n_enc) float or None, the fuser's own share of each encoder per sample
    (rows sum to 1 over kept encoders, 0 for dropped ones).
    """

    tokens: torch.Tensor
    token_encoder: torch.Tensor
    visible: torch.Tensor
    encoder_weights: torch.Tensor | None = None


class Fuser(nn.Module, ABC):
    """Base class: bookkeeping of the encoders' sizes, input checks and token reduction.

    ``encoder_dims`` / ``encoder_tokens`` / ``encoder_prefix``: per encoder (in fusion order) its width
    ``D_e``, its number of tokens ``N_e`` and how many of them are prefix tokens ([CLS], registers;
    default 1 each); the rest form a square patch grid. ``tokens_per_encoder`` ``K`` (a perfect square,
    or None) pools each grid to ``sqrt(K) x sqrt(K)`` tokens. Subclasses register the ``token_encoder``
    buffer ``(N,)`` and set ``reports_encoder_weights`` if their output carries ``encoder_weights``.
    """

    reports_encoder_weights: ClassVar[bool] = False
    # Whether forward reads ``text`` (the LM head skips the text encoder for fusers that do not).
    uses_text: ClassVar[bool] = False
    token_encoder: torch.Tensor

    def __init__(
        self,
        encoder_dims: Mapping[str, int],
        encoder_tokens: Mapping[str, int],
        width: int,
        encoder_prefix: Mapping[str, int] | None = None,
        tokens_per_encoder: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder_names = list(encoder_dims)
        if not self.encoder_names:
            raise ValueError("a fuser needs at least one encoder")
        encoder_prefix = dict(encoder_prefix) if encoder_prefix is not None else dict.fromkeys(self.encoder_names, 1)
        for what, mapping in (("encoder_tokens", encoder_tokens), ("encoder_prefix", encoder_prefix)):
            if list(mapping) != self.encoder_names:
                raise ValueError(f"{what} keys {list(mapping)} differ from {self.encoder_names}")
        self.encoder_dims = {n: int(d) for n, d in encoder_dims.items()}
        self.encoder_tokens = {n: int(t) for n, t in encoder_tokens.items()}
        self.encoder_prefix = {n: int(p) for n, p in encoder_prefix.items()}
        for name in self.encoder_names:
            if not 0 <= self.encoder_prefix[name] <= self.encoder_tokens[name]:
                raise ValueError(
                    f"encoder {name!r}: {self.encoder_prefix[name]} prefix tokens for "
                    f"{self.encoder_tokens[name]} tokens"
                )
        self.width = width
        self.tokens_per_encoder = tokens_per_encoder
        self.pooled_side = pooled_grid_side(tokens_per_encoder) if tokens_per_encoder is not None else None

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to the fuser) left out of weight decay: the positional embeddings every
        fuser learns (a parameter, or a dict of them per encoder); subclasses add their own embeddings/tokens."""
        return {"pos_embed"}

    @property
    def num_tokens(self) -> int:
        """Number ``N`` of visual tokens the fuser outputs."""
        return int(self.token_encoder.numel())

    @property
    def mixes_encoders(self) -> bool:
        """True if some output tokens mix encoders (``token_encoder == MIXED_GROUP``)."""
        return bool((self.token_encoder == MIXED_GROUP).any())

    def grid_side(self, name: str) -> int:
        """Side of encoder ``name``'s patch grid (ValueError naming it if the grid is not square)."""
        return patch_grid_side(name, self.encoder_tokens[name], self.encoder_prefix[name])

    def reduced_tokens(self, name: str) -> int:
        """Tokens of encoder ``name`` after :meth:`reduce` (prefix + K, or all of them without K)."""
        if self.pooled_side is None:
            return self.encoder_tokens[name]
        if self.pooled_side > self.grid_side(name):
            side = self.grid_side(name)
            raise ValueError(
                f"tokens_per_encoder={self.tokens_per_encoder} exceeds encoder {name!r}'s {side} x {side} "
                "patch grid; token reduction only shrinks grids"
            )
        return self.encoder_prefix[name] + self.pooled_side**2

    def reduce(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``(B, N_e, D_e)`` -> ``(B, P_e + K, D_e)``: prefix tokens kept, patch grid average-pooled to K."""
        if self.pooled_side is None:
            return x
        return pool_tokens(x, self.encoder_prefix[name], self.pooled_side)

    def common_grid_side(self) -> int:
        """Side of the one grid that grid-mixing fusers resample every encoder to: ``sqrt(K)`` if
        ``tokens_per_encoder`` is set, else the largest encoder grid (no encoder loses resolution)."""
        sides = [self.grid_side(n) for n in self.encoder_names]  # checks every grid is square
        return self.pooled_side if self.pooled_side is not None else max(sides)

    def to_common_grid(self, name: str, x: torch.Tensor, side: int, mode: str = "bilinear") -> torch.Tensor:
        """``(B, N_e, D_e)`` -> ``(B, 1 + side*side, D_e)``: the encoder's summary token (mean of its prefix
        tokens), then its patch grid resampled to ``side x side`` (pooled if smaller, interpolated if larger)."""
        prefix = self.encoder_prefix[name]
        return torch.cat([summary_token(x, prefix), resample_grid(x[:, prefix:], side, mode)], dim=1)

    def check_inputs(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor) -> None:
        """Every encoder's features present, ``keep`` ``(B, n_enc)``, and no sample without any encoder."""
        missing = [n for n in self.encoder_names if n not in features]
        if missing:
            raise KeyError(f"features missing for encoders {missing}; got {list(features)}")
        batch = features[self.encoder_names[0]].shape[0]
        if keep.shape != (batch, len(self.encoder_names)):
            raise ValueError(
                f"expected keep of shape ({batch}, {len(self.encoder_names)}) for encoders "
                f"{self.encoder_names}, got {tuple(keep.shape)}"
            )
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            raise ValueError(f"samples {empty.nonzero().flatten().tolist()} keep no encoder; keep at least one")
        for name in self.encoder_names:
            self._check_tokens(name, int(features[name].shape[-2]))

    def _check_tokens(self, name: str, n: int) -> None:
        """Encoder ``name``'s features hold all its tokens or, when this model pools to K, prefix + K (a feature
        cache pooled to the same K: pooling K -> K is the identity). Any other count (a cache pooled to another
        K) would be pooled again, silently unlike the model's own pooling: refused naming both values."""
        full, prefix = self.encoder_tokens[name], self.encoder_prefix[name]
        if n == full or (self.pooled_side is not None and n == prefix + self.pooled_side**2):
            return
        takes = f"{full} tokens" + (
            f" or {prefix} + {self.pooled_side**2} pooled ones" if self.pooled_side is not None else ""
        )
        raise ValueError(
            f"features of encoder {name!r} hold {n} tokens ({prefix} prefix + {n - prefix} patches: a feature cache "
            f"pooled to cache.tokens_per_encoder={n - prefix}?), but this model has fusion.tokens_per_encoder="
            f"{self.tokens_per_encoder} and takes {takes}; set fusion.tokens_per_encoder={n - prefix} or "
            f"cache.tokens_per_encoder={self.tokens_per_encoder if self.tokens_per_encoder is not None else 'null'}"
        )

    @abstractmethod
    def forward(
        self,
        features: Mapping[str, torch.Tensor],
        keep: torch.Tensor,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> FusedTokens:
        """``features[name]`` (B, N_e, D_e); ``keep`` (B, n_enc) bool; ``text`` (B, L, D) projected text
        tokens and ``text_mask`` (B, L) bool (used by text-conditioned fusers)."""
