"""Building caches: encode every unique image once, in batches, optionally one shard of the key set.

:func:`build_cache` writes one cache (or one shard of it) under a file lock, so concurrent builders of
the same cache end with one valid copy: the first builds, the others wait and open its result.
:func:`ensure_cache` is the "build on first use" entry training calls: it opens a matching cache, merges
finished shards, or builds, and refuses (or rebuilds) caches made for another encoder configuration.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from fusion.counter import progress_counter
from fusion.data.cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheKeyError,
    CacheNotFoundError,
    FingerprintMismatchError,
)
from fusion.data.cache.files import keys_digest
from fusion.data.cache.fingerprint import cache_fingerprint, normalize_dtype, stored_tokens
from fusion.data.cache.layout import cache_path, find_shards, lock_path, nearest_mismatch
from fusion.data.cache.merge import merge_shards
from fusion.data.cache.storage import quantise
from fusion.data.cache.store import FeatureCache
from fusion.data.cache.writer import PartialCache, check_writable, disk_errors, is_disk_error
from fusion.data.images import load_image  # the training path's decoder: cached and online pixels match
from fusion.encoders.grid import pool_tokens, pooled_grid_side

log = logging.getLogger(__name__)

ImagePaths = Mapping[str, "str | os.PathLike"]


def images_of(examples: Iterable[Any]) -> dict[str, Path]:
    """Unique ``{image_key: image_path}`` of task examples (all their images); one key, one path."""
    out: dict[str, Path] = {}
    for ex in examples:
        pairs = getattr(ex, "images", None) or ((ex.image_key, ex.image_path),)
        for key, path in pairs:
            if out.setdefault(key, Path(path)) != Path(path):
                raise ValueError(f"image key {key!r} names two files: {out[key]} and {path}")
    return out


def shard_keys(keys: Iterable[str], shard: int, num_shards: int) -> list[str]:
    """Shard ``shard`` of ``num_shards``: a contiguous block of the sorted keys (sizes differ by <= 1).

    Contiguous, so the shards concatenated in order are the unsharded cache, row for row.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard={shard} is out of range for num_shards={num_shards} (0..{num_shards - 1})")
    ordered = sorted(keys)
    lo, hi = shard * len(ordered) // num_shards, (shard + 1) * len(ordered) // num_shards
    return ordered[lo:hi]


class ImageFiles(Dataset):
    """``(key, path)`` pairs -> ``(3, H, W)`` pixels through the encoder's own eval transform."""

    def __init__(self, items: Sequence[tuple[str, os.PathLike | str]], transform: Callable[[Any], torch.Tensor]):
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(Path(self.items[i][1])))


def build_cache(
    encoder: Any,
    images: ImagePaths,
    root: str | os.PathLike,
    *,
    dtype: str = "float16",
    tokens_per_encoder: int | None = None,
    shard: int | None = None,
    num_shards: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    force: bool = False,
    progress: bool = True,
    sync_every: float = 30.0,
    on_batch: Callable[[int], None] | None = None,
) -> FeatureCache:
    """Encode ``images`` (``{image_key: path}``) with ``encoder`` into the cache under ``root``; open it.

    With ``shard``/``num_shards`` only that shard of the sorted keys is built, into its own folder
    (merge with :func:`~fusion.data.cache.merge.merge_shards`). A matching complete cache holding every key
    is reused unless ``force``; one lacking some keys is extended by them (its rows copied and checked
    against its checksums, only the new images encoded; unsharded builds; a damaged row found while
    copying makes it a fresh build of ``images``); an interrupted build of the same cache resumes.
    ``sync_every`` seconds between progress records; ``on_batch(rows_done)`` is called after each batch
    (progress hooks, tests). An empty ``images`` raises :class:`ValueError` and writes nothing (an empty
    shard of a non-empty image set is built: merging needs every shard).

    ``dtype``: float16, float32, int8 or float8_e4m3fn (see :mod:`fusion.data.cache.storage`);
    ``tokens_per_encoder`` K: store each image's patch grid pooled to K tokens ([CLS]/prefix kept) with the
    model's own pooling (:func:`fusion.encoders.grid.pool_tokens`, in float32, before the dtype rounding).
    """
    fp = cache_fingerprint(encoder, dtype, tokens_per_encoder)
    root = Path(root)
    all_keys = sorted(images)
    if not all_keys:  # checked before anything is created: an empty cache would look complete
        raise ValueError(
            f"no images to cache for encoder {fp.get('name')!r} under {root}: the image set is empty (an image "
            "folder without images, or task splits without examples?); nothing was built"
        )
    keys = all_keys if num_shards is None else shard_keys(all_keys, shard or 0, num_shards)
    path = cache_path(root, fp, shard, num_shards)
    check_writable(root)
    opts = dict(shard=shard, num_shards=num_shards, batch_size=batch_size, num_workers=num_workers,
                 progress=progress, sync_every=sync_every, on_batch=on_batch)
    with FileLock(lock_path(path)):
        previous = None if force else _open_matching(path, fp)
        if previous is not None and _missing_keys_error(previous, keys) is None:
            return previous  # built by another process while we waited
        try:
            _build_locked(encoder, images, path, fp, keys, all_keys, previous, resume=not force, **opts)
        except CacheCorruptError as e:
            if previous is None or num_shards is not None:
                raise
            log.warning("feature cache %s: %s; encoding every image instead of extending it", path, e)
            _build_locked(encoder, images, path, fp, keys, all_keys, None, resume=False, **opts)
    return FeatureCache(path, fp)


def _build_locked(
    encoder: Any,
    images: ImagePaths,
    path: Path,
    fp: dict[str, Any],
    keys: list[str],
    all_keys: list[str],
    previous: FeatureCache | None,
    *,
    resume: bool,
    shard: int | None,
    num_shards: int | None,
    batch_size: int,
    num_workers: int,
    progress: bool,
    sync_every: float,
    on_batch: Callable[[int], None] | None,
) -> None:
    """The body of :func:`build_cache`, under its lock: write and publish the cache of ``keys`` at ``path``.

    ``previous`` is the matching cache there that lacks some of ``keys``: an unsharded build extends it.
    """
    if previous is not None and num_shards is None:
        # Extend it: its rows are kept as they are, and only the images it lacks are encoded.
        keys = previous.keys + previous.missing(keys)
        all_keys = keys
    meta: dict[str, Any] = {
        "fingerprint": fp,
        "shape": [len(keys), stored_tokens(fp), int(encoder.embed_dim)],
        "dtype": fp["dtype"],
        "keys_digest": keys_digest(keys),
        "shard": None,
    }
    if num_shards is not None:  # what merging checks: which shard, and of which whole key set
        meta["shard"] = {"index": shard or 0, "count": num_shards}
        meta["shard"].update(num_keys=len(all_keys), keys_digest=keys_digest(all_keys))
    partial = PartialCache(path, meta, keys)
    with disk_errors(path, partial.nbytes):
        try:
            done = partial.open(resume=resume)
            if done:
                log.info("feature cache %s: resuming after %d of %d images", path, done, len(keys))
            elif previous is not None and num_shards is None:
                done = _copy_rows(previous, partial)
                log.info("feature cache %s: extending %d cached images by %d", path, done, len(keys) - done)
            _encode_into(partial, encoder, [(k, images[k]) for k in keys[done:]], done, batch_size,
                         num_workers, progress, sync_every, on_batch)
            partial.finish()
        except OSError as e:
            # A full disk or lost permission: a resume would hit it again, so free the space now. Other
            # errors (an unreadable image...) keep the partial build for a resume once fixed.
            if is_disk_error(e):
                partial.discard()
            raise
        finally:
            partial.close()
        if not partial.publish():
            log.info("feature cache %s: another process published it first; using theirs", path)


def ensure_cache(
    encoder: Any,
    images: ImagePaths,
    root: str | os.PathLike,
    *,
    dtype: str = "float16",
    tokens_per_encoder: int | None = None,
    rebuild: bool = True,
    **build_kwargs: Any,
) -> FeatureCache:
    """The cache of ``encoder`` under ``root`` holding every key of ``images``, built on first use.

    A complete matching cache is opened as is (no lock, no encoder run). Finished shards of it are
    merged if they hold every key of ``images`` (more is fine: the merged cache keeps them all); shards
    lacking some are left alone and the cache is built whole (a warning says how many images they lack).
    With ``rebuild=True`` a cache lacking some keys is extended by the missing images (the cached ones
    are not encoded again), and a damaged cache, or (in its place) caches only of other configurations
    of this encoder, are rebuilt; with ``rebuild=False`` they raise
    :class:`~fusion.data.cache.errors.CacheError` naming what differs (another pooling or dtype among them).
    No cache at all is always built. ``dtype`` / ``tokens_per_encoder``: the storage, see :func:`build_cache`.
    """
    fp = cache_fingerprint(encoder, normalize_dtype(dtype), tokens_per_encoder)
    root, keys = Path(root), sorted(images)
    path = cache_path(root, fp)
    try:
        cache = FeatureCache(path, fp)
        problem: CacheError | None = _missing_keys_error(cache, keys)
        if problem is None:
            return cache
    except CacheNotFoundError:
        problem = None
    except (CacheCorruptError, FingerprintMismatchError) as e:
        problem = e
    if problem is None:
        shards = find_shards(path)
        if shards:
            try:
                return merge_shards(root, fp, max(shards), keys=keys)
            except CacheError as e:  # e.g. a shard still building: build the whole cache instead
                log.warning("feature cache %s: cannot merge its shards (%s); building it whole", path, e)
        elif not rebuild:
            problem = nearest_mismatch(root, fp)
    if problem is not None and not rebuild:
        raise type(problem)(f"{problem}; pass rebuild=True (cache.rebuild=true) to build a new cache") from problem
    if problem is not None:
        action = "extending it" if isinstance(problem, CacheKeyError) else "rebuilding"
        log.warning("feature cache %s: %s; %s", path, problem, action)
    # A cache lacking some images is extended by them (build_cache keeps its rows); damaged ones are rebuilt.
    return build_cache(encoder, images, root, dtype=dtype, tokens_per_encoder=tokens_per_encoder, **build_kwargs)


def _open_matching(path: Path, fp: dict[str, Any]) -> FeatureCache | None:
    """The cache at ``path`` if it is complete and matches ``fp``; else None."""
    try:
        return FeatureCache(path, fp)
    except CacheError:
        return None


def _copy_rows(previous: FeatureCache, partial: PartialCache, chunk: int = 1024) -> int:
    """Copy every row of ``previous`` into the first rows of ``partial`` (same keys, same order).

    Each row is checked against ``previous``'s checksum as it is copied (opening checked only a sample):
    a damaged row raises :class:`CacheCorruptError` rather than moving into the new cache.
    """
    keys = previous.keys
    if partial.keys[: len(keys)] != keys:
        raise RuntimeError(f"feature cache {partial.final}: extension does not start with the cached keys")
    for start in range(0, len(keys), chunk):
        rows, scales = previous.read_stored(np.arange(start, min(len(keys), start + chunk)))  # as stored
        partial.write(start, rows, scales)
        previous.check_copied(start, partial.checksums[start : start + len(rows), 1])
    partial.checkpoint(len(keys))
    return len(keys)


def _missing_keys_error(cache: FeatureCache, keys: Sequence[str]) -> CacheKeyError | None:
    missing = cache.missing(keys)
    if not missing:
        return None
    return CacheKeyError(
        f"feature cache {cache.path} lacks {len(missing)} of the {len(keys)} requested images "
        f"(first: {missing[0]!r}); it was built for another image set"
    )


def _encode_into(
    partial: PartialCache,
    encoder: Any,
    items: list[tuple[str, Any]],
    start: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    sync_every: float,
    on_batch: Callable[[int], None] | None,
) -> None:
    """Run ``encoder`` over ``items`` in order and write rows ``start..`` of ``partial`` (pooled and
    quantised as its fingerprint says)."""
    n_total, _, _ = partial.shape
    storage = partial.storage
    pooling = partial.meta["fingerprint"].get("pooling")
    expected = (int(encoder.num_tokens), partial.shape[2])
    loader = DataLoader(
        ImageFiles(items, encoder.preprocess.transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers if items else 0,
    )
    device = next(encoder.parameters(), torch.empty(0)).device
    row, last_sync = start, time.monotonic()
    bar = progress_counter(total=n_total, initial=start, unit="img", desc=f"cache {partial.final.name}",
                           disable=not progress, dynamic_ncols=True)
    with bar, torch.inference_mode():
        for pixels in loader:
            feats = encoder(pixels.to(device, non_blocking=True))  # (B, T, D)
            if tuple(feats.shape[1:]) != expected:
                raise RuntimeError(f"encoder {encoder.name!r} gave {tuple(feats.shape)}, expected (B, {expected})")
            if pooling:
                # The model's own pooling, in float32: a run on this cache sees what pooling a full float32
                # cache in the model gives; the dtype rounding comes after, once.
                side = pooled_grid_side(pooling["tokens_per_encoder"])
                feats = pool_tokens(feats.float(), int(pooling["prefix_tokens"]), side)
            # float16, int8 and float8 caches are read back as float16 (scales too are float16).
            if storage.name != "float32" and not torch.isfinite(feats.half()).all() and torch.isfinite(feats).all():
                raise OverflowError(
                    f"encoder {encoder.name!r} features exceed the float16 range (max |x| = "
                    f"{feats.abs().max().item():.3g}); build the cache with dtype=float32"
                )
            if storage.quantised:
                partial.write(row, *quantise(feats, storage))
            else:
                partial.write(row, feats.to(storage.read_dtype).cpu().numpy())
            row += len(feats)
            bar.update(len(feats))
            if time.monotonic() - last_sync >= sync_every:
                partial.checkpoint(row)
                last_sync = time.monotonic()
            if on_batch is not None:
                on_batch(row)
    if row != n_total:
        raise RuntimeError(f"feature cache {partial.final}: wrote {row} of {n_total} rows")
