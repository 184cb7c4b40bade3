"""Patch-grid helpers shared by the fusers: grid sizes, pooling/resampling, prefix tokens.

Encoder tokens are ``(B, P + s*s, D)``: ``P`` prefix tokens ([CLS], registers) followed by an ``s x s``
patch grid flattened row-major, as timm and transformers lay them out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def patch_grid_side(name: str, num_tokens: int, num_prefix: int) -> int:
    """Side ``s`` of encoder ``name``'s square patch grid; ValueError naming the encoder if not square."""
    patches = num_tokens - num_prefix
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches:
        raise ValueError(
            f"encoder {name!r}: its {patches} patch tokens ({num_tokens} tokens minus {num_prefix} prefix "
            "tokens) do not form a square grid; this fuser / tokens_per_encoder needs square patch grids "
            "(check the encoder's num_prefix_tokens and input size)"
        )
    return side


def pooled_grid_side(tokens_per_encoder: int) -> int:
    """Side of the pooled grid for ``tokens_per_encoder`` patch tokens, which must be a perfect square."""
    side = math.isqrt(max(int(tokens_per_encoder), 0))
    if tokens_per_encoder < 1 or side * side != tokens_per_encoder:
        raise ValueError(
            f"tokens_per_encoder={tokens_per_encoder} is not a perfect square: the patches are pooled to a "
            "side x side grid, e.g. 16 (4 x 4) or 64 (8 x 8)"
        )
    return side


def resample_grid(patches: torch.Tensor, side: int, mode: str = "bilinear") -> torch.Tensor:
    """``(B, s*s, D)`` patch tokens -> ``(B, side*side, D)`` on a ``side x side`` grid.

    Shrinking uses adaptive average pooling (every patch counts, no aliasing); growing interpolates
    with ``mode`` (``F.interpolate``). The same size is returned unchanged.
    """
    B, N, D = patches.shape
    s = math.isqrt(N)
    if s * s != N:
        raise ValueError(f"expected a square patch grid, got {N} patch tokens")
    if s == side:
        return patches
    grid = patches.transpose(1, 2).reshape(B, D, s, s)
    if side < s:
        grid = F.adaptive_avg_pool2d(grid, side)
    else:
        align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
        grid = F.interpolate(grid, size=(side, side), mode=mode, align_corners=align)
    return grid.flatten(2).transpose(1, 2)


def pool_tokens(tokens: torch.Tensor, num_prefix: int, side: int) -> torch.Tensor:
    """``(B, P + s*s, D)`` -> ``(B, P + side*side, D)``: prefix tokens kept, patch grid pooled to ``side``.

    The one token reduction of the fusers (``Fuser.reduce``) and of pooled feature caches (built with it,
    so a run on a pooled cache sees what the model would have computed); ``side == s`` is the identity.
    """
    return torch.cat([tokens[:, :num_prefix], resample_grid(tokens[:, num_prefix:], side)], dim=1)


def summary_token(tokens: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """One global token ``(B, 1, D)``: the mean of the prefix tokens, or of the patches if there are none."""
    source = tokens[:, :num_prefix] if num_prefix else tokens
    return source.mean(dim=1, keepdim=True)
