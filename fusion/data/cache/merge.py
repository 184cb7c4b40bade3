"""Merging the shards of one cache (built in parallel, e.g. by a SLURM array) into the cache itself.

Shards are complete caches of contiguous blocks of the sorted keys (see
:func:`fusion.data.cache.build.shard_keys`), so the merged cache equals an unsharded build row for row, its
checksums included: they are recomputed from the rows as they are copied and must equal the shards' own,
so a damaged shard stops the merge (naming its file and rows) before anything is published. A
request for fewer images than the shards hold (e.g. one split after extracting all of them) merges them
all: the merged cache serves the request and any later one within the shards' image set.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from fusion.data.cache.errors import CacheCorruptError, CacheError, CacheKeyError, CacheNotFoundError
from fusion.data.cache.files import keys_digest
from fusion.data.cache.layout import cache_path, lock_path
from fusion.data.cache.store import FeatureCache
from fusion.data.cache.writer import PartialCache, check_writable, disk_errors

log = logging.getLogger(__name__)

# Rows copied per write: bounded memory whatever the shard size.
_CHUNK_ROWS = 1024


def merge_shards(
    root: str | Path,
    fingerprint: dict[str, Any],
    num_shards: int,
    *,
    keys: Sequence[str] | None = None,
    keep_shards: bool = False,
) -> FeatureCache:
    """Combine the ``num_shards`` complete shards of the cache of ``fingerprint`` into one cache.

    ``fingerprint`` is :func:`~fusion.data.cache.fingerprint.cache_fingerprint` of the encoder. All shards
    must be present, complete, of that fingerprint and of one image set; otherwise
    :class:`~fusion.data.cache.errors.CacheError` says which shard is wrong. ``keys``, when given, are the
    images the caller needs: the shards must hold every one of them (:class:`CacheKeyError` says how many
    they lack, before anything is written) and may hold more; the merged cache holds all the shards'
    images. The shards are deleted after the merged cache is published unless ``keep_shards``.
    """
    root = Path(root)
    final = cache_path(root, fingerprint)
    check_writable(root)
    with FileLock(lock_path(final)):
        existing = None
        try:
            existing = FeatureCache(final, fingerprint)  # merged (or built) by another process meanwhile
        except CacheNotFoundError:
            pass
        except CacheError as e:
            log.warning("feature cache %s: %s; replacing it with the merged shards", final, e)
        if existing is not None:
            missing = existing.missing(keys or [])
            if missing:  # not replaced by the shards: the caller extends it by the missing images
                raise CacheKeyError(
                    f"feature cache {final} lacks {len(missing)} of the {len(keys)} requested images "
                    f"(first: {missing[0]!r}); not merging its shards into it"
                )
            return existing
        shards = [_open_shard(root, fingerprint, i, num_shards) for i in range(num_shards)]
        _check_one_set(shards, keys)
        merged_keys = [k for s in shards for k in s.keys]
        n, t, d = len(merged_keys), shards[0].shape[1], shards[0].shape[2]
        meta = {
            "fingerprint": fingerprint,
            "shape": [n, t, d],
            "dtype": fingerprint["dtype"],
            "keys_digest": keys_digest(merged_keys),
            "shard": None,
            "merged_from": num_shards,
        }
        partial = PartialCache(final, meta, merged_keys)
        with disk_errors(final, partial.nbytes):
            try:
                partial.open(resume=False)
                row = 0
                for shard in shards:
                    for lo in range(0, len(shard), _CHUNK_ROWS):
                        # As stored (quantised rows with their scales): merging never re-rounds.
                        chunk, scales = shard.read_stored(np.arange(lo, min(len(shard), lo + _CHUNK_ROWS)))
                        partial.write(row + lo, chunk, scales)
                        shard.check_copied(lo, partial.checksums[row + lo : row + lo + len(chunk), 1])
                    row += len(shard)
                partial.finish()
            except BaseException:
                partial.discard()  # a merge is a cheap copy: rerun it whole rather than resume
                raise
            finally:
                partial.close()
            partial.publish()
        if not keep_shards:
            for shard in shards:
                shutil.rmtree(shard.path, ignore_errors=True)
    return FeatureCache(final, fingerprint)


def _open_shard(root: Path, fingerprint: dict[str, Any], i: int, num_shards: int) -> FeatureCache:
    path = cache_path(root, fingerprint, i, num_shards)
    try:
        shard = FeatureCache(path, fingerprint)
    except CacheNotFoundError as e:
        raise CacheNotFoundError(f"cannot merge: shard {i} of {num_shards} is missing or unfinished ({e})") from e
    info = shard.meta.get("shard") or {}
    if info.get("index") != i or info.get("count") != num_shards:
        raise CacheCorruptError(f"cannot merge: {path} says it is shard {info.get('index')} of {info.get('count')}")
    return shard


def _check_one_set(shards: list[FeatureCache], keys: Sequence[str] | None) -> None:
    """All shards split the same sorted key set, together hold all of it, and it holds every one of ``keys``."""
    parents = {(s.meta["shard"]["keys_digest"], s.meta["shard"]["num_keys"]) for s in shards}
    if len(parents) != 1:
        raise CacheCorruptError(
            f"cannot merge {[str(s.path) for s in shards]}: the shards were built for different image sets"
        )
    ((digest, num_keys),) = parents
    merged = [k for s in shards for k in s.keys]
    if len(merged) != num_keys or keys_digest(merged) != digest:
        raise CacheCorruptError(
            f"cannot merge: the shards of {_cache_name(shards[0])} do not add up to their image set"
        )
    if keys is not None:
        # A superset is fine (a split of the extracted images); only images the shards lack stop the merge.
        missing = list(keys)
        for shard in shards:
            missing = shard.missing(missing)
        if missing:
            raise CacheKeyError(
                f"cannot merge the shards of {_cache_name(shards[0])}: they hold {num_keys} images but lack "
                f"{len(missing)} of the {len(keys)} requested (first: {', '.join(map(repr, missing[:3]))})"
            )


def _cache_name(shard: FeatureCache) -> Path:
    """The cache folder a shard belongs to (``<name>-<hash>`` without ``.shard-i-of-n``)."""
    return shard.path.with_name(shard.path.name.split(".shard-")[0])
