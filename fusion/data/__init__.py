"""Data: examples and images -> batches, and the frozen-feature cache that replaces the encoders.

Owns :mod:`.module` (the Lightning data module, dataset and collator), :mod:`.images` (decoding),
:mod:`.samplers` (resumable training order), :mod:`.distributed` (rank-0 and evaluation shards) and
:mod:`.cache` (building, reading and verifying feature caches, and their settings). Imports tasks and
encoders; never fusers, the model or training.
"""
