"""Frozen-feature cache: each (encoder, image) feature computed once, read by rows everywhere after.

- :func:`ensure_cache` (build on first use) / :func:`build_cache` (one cache or one shard of it) /
  :func:`merge_shards` write caches; :class:`FeatureCache` reads one: ``cache.get(image_keys)`` ->
  ``(B, T, D)`` tensor; ``cache.verify()`` (``python -m fusion.data.cache verify <folder>``) checks every row
  against the checksums the build recorded.
- On-disk layout: :mod:`fusion.data.cache.store`; naming: :mod:`fusion.data.cache.layout`; what identifies a
  cache: :mod:`fusion.data.cache.fingerprint`; command line: ``python -m fusion.data.cache --help``.
- Storage (``dtype``, ``tokens_per_encoder`` of the functions above; ``cache.dtype`` /
  ``cache.tokens_per_encoder`` of runs): float16, float32, or int8 / float8_e4m3fn rows with per-row
  float16 scales (:mod:`fusion.data.cache.storage`), of every token or of the patch grid pooled to K tokens
  at build time with the model's own pooling.
"""

from fusion.data.cache.build import build_cache, ensure_cache, images_of, shard_keys
from fusion.data.cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheKeyError,
    CacheNotFoundError,
    CacheUnverifiableError,
    CacheWriteError,
    FingerprintMismatchError,
)
from fusion.data.cache.fingerprint import cache_fingerprint
from fusion.data.cache.layout import cache_path
from fusion.data.cache.merge import merge_shards
from fusion.data.cache.store import FeatureCache

__all__ = [
    "CacheCorruptError",
    "CacheError",
    "CacheKeyError",
    "CacheNotFoundError",
    "CacheUnverifiableError",
    "CacheWriteError",
    "FeatureCache",
    "FingerprintMismatchError",
    "build_cache",
    "cache_fingerprint",
    "cache_path",
    "ensure_cache",
    "images_of",
    "merge_shards",
    "shard_keys",
]
