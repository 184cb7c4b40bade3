"""The multimodal transformer and its parts: fused visual tokens + text -> pooled representation -> head.

Owns :mod:`.transformer` (:class:`~fusion.model.transformer.FusionModel`), :mod:`.attention` (attention
blocks and their score functions), :mod:`.heads` (task heads), :mod:`.dropout` (VE-dropout) and
:mod:`.lm` / :mod:`.lm_parts` (the language-model head: a pretrained causal LM fed the fused tokens) and
:mod:`.tiny_lm` (tiny random LMs for the embedded LM experiment, their tokenizer trained on shapes text); the
token-group ids it marks positions with live in :mod:`fusion.fusers.groups`. Imports fusers, encoders'
geometry and (for the tiny LM's corpus) the shapes task; never data, training or logging.
"""
