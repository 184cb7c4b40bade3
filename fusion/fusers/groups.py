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

# The LM head (fusion.model.lm) lays out [BOS] + visual + prompt + answer per sample, left-padded: the
# attention read-out tells the prompt's queries from the answer's, and padding differs per sample.
ANSWER_GROUP = -4
PAD_GROUP = -5
ANSWER_NAME = "answer"
PROMPT_NAME = "prompt"  # the LM's prompt tokens (TEXT_GROUP) in its statistics
BOS_NAME = "bos"  # the LM's BOS token (CLS_GROUP) in its statistics
# With the LM head, no encoder may be called these either.
LM_RESERVED_NAMES = (*RESERVED_NAMES, ANSWER_NAME, PROMPT_NAME, BOS_NAME)
