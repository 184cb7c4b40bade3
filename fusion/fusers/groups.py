"""Token-group ids: which part of the transformer's input sequence a position belongs to.

Every position of the sequence ``[CLS] + text + visual tokens`` carries a group id (``key_groups`` of
:class:`fusion.model.transformer.FusionOutput`): a vision encoder's tokens carry that encoder's index
``0..n-1``; the ids below mark the rest. Statistics and analyses name the groups with ``*_NAME``.
"""

from __future__ import annotations

MIXED_GROUP = -3  # a visual token that mixes several encoders (channel_concat, resampler, gated)
CLS_GROUP = -2
TEXT_GROUP = -1

MIXED_NAME = "fused"
TEXT_NAME = "text"
CLS_NAME = "cls"
RESERVED_NAMES = (MIXED_NAME, TEXT_NAME, CLS_NAME)  # no encoder may be called one of these
