"""The multimodal transformer and its parts: fused visual tokens + text -> pooled representation -> head.

Owns :mod:`.transformer` (:class:`~fusion.model.transformer.FusionModel`), :mod:`.attention` (attention
blocks and their score functions), :mod:`.heads` (task heads), :mod:`.dropout` (VE-dropout) and
:mod:`.lm` / :mod:`.lm_parts` (the language-model head: a pretrained causal LM fed the fused tokens); the
token-group ids it marks positions with live in :mod:`fusion.fusers.groups`. Imports fusers and encoders'
geometry; never data, training or logging.
"""
