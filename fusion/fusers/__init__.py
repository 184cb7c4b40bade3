"""Fusers: turn several encoders' token features into one sequence of visual tokens.

Every fuser takes ``(encoder_dims, encoder_tokens, width, encoder_prefix, tokens_per_encoder, ...)``
and maps ``features`` + ``keep`` (+ the projected text) to :class:`FusedTokens`:

- :class:`TokenConcatFuser` each encoder's tokens projected and concatenated along the sequence;
- :class:`ChannelConcatFuser` encoders resampled to one grid and concatenated along the channels;
- :class:`ResamplerFuser` learned queries cross-attend to all encoders' tokens;
- :class:`GatedFuser` a text-conditioned gate mixes the encoders on one grid.
"""

from fusion.encoders.grid import patch_grid_side, pooled_grid_side, resample_grid
from fusion.fusers.base import FusedTokens, Fuser
from fusion.fusers.channel_concat import ChannelConcatFuser
from fusion.fusers.gated import GatedFuser
from fusion.fusers.groups import MIXED_GROUP
from fusion.fusers.resampler import ResamplerFuser
from fusion.fusers.token_concat import TokenConcatFuser

__all__ = [
    "MIXED_GROUP",
    "ChannelConcatFuser",
    "FusedTokens",
    "Fuser",
    "GatedFuser",
    "ResamplerFuser",
    "TokenConcatFuser",
    "patch_grid_side",
    "pooled_grid_side",
    "resample_grid",
]
