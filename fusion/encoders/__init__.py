"""Frozen encoders: what turns an image or a text into token features.

Owns :mod:`.vision` (timm and transformers vision towers, ``(B, T, D)`` tokens with a [CLS]/prefix),
:mod:`.text` (the text encoder and tokenizer), :mod:`.preprocess` (each encoder's own image transform)
and :mod:`.grid` (patch-grid geometry and pooling, shared by the cache and the fusers). Imports only
:mod:`fusion.options`; never the data module, the cache or anything that trains.
"""
