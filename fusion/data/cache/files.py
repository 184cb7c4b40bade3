"""The files of one published cache: their names, the checksums that cover them, reading and checking them.

A cache is one folder ``<root>/<encoder name>-<fingerprint hash>/`` holding

- ``features.npy``: the features, an ``(N, T, D)`` array in NumPy's ``.npy`` format, row ``i`` = the
  ``(T, D)`` tokens of one image ([CLS]/prefix first, as the encoder returns them; a pooled cache holds
  the prefix tokens and the patch grid pooled to K: ``T = prefix + K``), float16/float32, or quantised
  (meta.json's ``dtype`` int8: int8; float8_e4m3fn: its raw bytes as uint8), see :mod:`fusion.data.cache.storage`;
- ``scales.npy`` (quantised caches only): ``(N, T)`` float16, the scale of each token row;
- ``index.json``: ``{image_key: row}`` (read and checked once on opening, then held compactly: see
  :class:`FeatureCache`);
- ``checksums.npy``: ``(N, 2)`` uint64, row ``i`` = the 64-bit BLAKE2b of row ``i``'s image key (column 0)
  and of that key, a NUL and the row's stored bytes (column 1: ``features.npy``'s row, followed for a
  quantised cache by its ``scales.npy`` row), computed from the rows as the build wrote them;
- ``meta.json``: the full fingerprint (see :mod:`fusion.data.cache.fingerprint`), ``shape``, ``dtype``, the
  digest of the sorted key list, for a shard which shard it is, and ``integrity``: the sha256 of
  ``checksums.npy`` and of the keys in row order;
- ``COMPLETE``: the completeness marker, written last before the folder is published.

These functions read and check one file each (:class:`fusion.data.cache.store.FeatureCache` opens a cache
with them) and compute the checksums and digests the build writes (:mod:`fusion.data.cache.writer`) and
the reader checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion.data.cache.errors import CacheCorruptError, CacheNotFoundError
from fusion.data.cache.storage import STORAGES

DATA = "features.npy"
INDEX = "index.json"
META = "meta.json"
CHECKSUMS = "checksums.npy"
COMPLETE = "COMPLETE"
# Rows whose checksums opening a cache checks (evenly spaced, first and last included): a bounded read.
SAMPLE_ROWS = 64
CHECKSUM_ALGORITHM = "blake2b-64"
CHECKSUM_COLUMNS = ["key", "key NUL row bytes"]


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the sorted key list: identifies the image set a cache (or a shard's parent) covers."""
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode())
        h.update(b"\0")
    return h.hexdigest()


def key_checksums(keys: Sequence[bytes]) -> np.ndarray:
    """``(B,)`` uint64: the 64-bit BLAKE2b of each UTF-8 key (column 0 of ``checksums.npy``)."""
    return np.frombuffer(b"".join(hashlib.blake2b(k, digest_size=8).digest() for k in keys), dtype="<u8").copy()


def row_checksums(keys: Sequence[bytes], rows: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """``(B,)`` uint64: the 64-bit BLAKE2b of each key, a NUL and its ``(T, D)`` row's bytes (column 1),
    followed for a quantised cache by the row's ``(T,)`` scales' bytes (the checksum covers what is stored).

    The key is hashed with the row so that a row read under another key (an index mapping keys to other
    rows) fails just as changed bytes do; keys never hold a NUL, so the pair is unambiguous. A float16
    cache's checksums are those caches had before quantised storage existed.
    """
    rows = np.ascontiguousarray(rows)
    if len(keys) != len(rows) or (scales is not None and len(scales) != len(rows)):
        extra = f" and {len(scales)} scales" if scales is not None else ""
        raise ValueError(f"{len(keys)} keys for {len(rows)} rows{extra}")
    scales = None if scales is None else np.ascontiguousarray(scales)
    digests = []
    for i, (key, row) in enumerate(zip(keys, rows, strict=True)):
        h = hashlib.blake2b(key, digest_size=8)
        h.update(b"\0")
        h.update(row)
        if scales is not None:
            h.update(scales[i])
        digests.append(h.digest())
    return np.frombuffer(b"".join(digests), dtype="<u8").copy()


def order_digest(keys: Iterable[bytes]) -> str:
    """sha256 of the UTF-8 keys in row order: identifies which key each row belongs to."""
    h = hashlib.sha256()
    for k in keys:
        h.update(k)
        h.update(b"\0")
    return h.hexdigest()


def checksum_file_bytes(table: np.ndarray) -> bytes:
    """``checksums.npy``'s content for an ``(N, 2)`` uint64 table (its sha256 goes into ``meta.json``)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(table, dtype="<u8"), allow_pickle=False)
    return buf.getvalue()


def sample_rows(num_rows: int, count: int = SAMPLE_ROWS) -> np.ndarray:
    """``count`` evenly spaced rows of ``num_rows`` (all of them if fewer), first and last included."""
    if num_rows <= 0 or count <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, num_rows - 1, num=min(num_rows, count)).round().astype(np.int64))


def read_into(fd: int, view: memoryview, pos: int, what: str) -> None:
    """Fill ``view`` from byte ``pos`` of the open file ``what`` names (positioned reads; a short file fails)."""
    while view:  # a positioned read may return less than asked
        n = os.preadv(fd, [view], pos)
        if n == 0:
            raise CacheCorruptError(f"{what} ended at byte {pos} while reading; it was truncated after it was opened")
        view, pos = view[n:], pos + n


def read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from a ``.npy`` header, without touching the data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise CacheCorruptError(f"{path}: Fortran-ordered array; caches are always C-ordered")
        return tuple(shape), np.dtype(dtype), f.tell()



def read_runs(fd: int, rows: np.ndarray, out: np.ndarray, offset: int, size: int, what: str) -> None:
    """Rows ``rows`` (of ``size`` bytes each, from byte ``offset`` of ``fd``) into ``out``; runs in one read."""
    if not len(rows):
        return
    buf = memoryview(out.reshape(-1)).cast("B")
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip([0, *starts.tolist()], [*starts.tolist(), len(rows)], strict=True):
        read_into(fd, buf[lo * size : hi * size], offset + int(rows[lo]) * size, what)




def read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` of the complete cache ``path``, its shape and dtype checked."""
    if not path.is_dir():
        raise CacheNotFoundError(f"no feature cache at {path}")
    if not (path / COMPLETE).is_file():
        raise CacheNotFoundError(f"feature cache {path} is incomplete (no {COMPLETE} marker): its build did not finish")
    try:
        meta = json.loads((path / META).read_text())
        shape, dtype = tuple(int(v) for v in meta["shape"]), meta["dtype"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheCorruptError(f"feature cache {path}: unreadable {META} ({type(e).__name__}: {e})") from e
    if len(shape) != 3 or dtype not in STORAGES:
        raise CacheCorruptError(
            f"feature cache {path}: {META} has shape {shape} / dtype {dtype!r}; want (N, T, D) and one of "
            f"{', '.join(STORAGES)}"
        )
    return meta


def read_index(path: Path, num_rows: int) -> dict[str, int]:
    """``index.json`` of ``path``, checked to map every key to its own row of ``num_rows``."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"feature cache {path}: unreadable {INDEX} ({type(e).__name__}: {e})") from e
    if not isinstance(index, dict):
        raise CacheCorruptError(f"feature cache {path}: {INDEX} holds a {type(index).__name__}, want {{key: row}}")
    for key, row in index.items():
        if not isinstance(row, int) or not 0 <= row < num_rows:
            raise CacheCorruptError(
                f"feature cache {path}: {INDEX} lists image {key!r} at row {row!r}, "
                f"but {DATA} holds only {num_rows} rows"
            )
    if len(index) != num_rows or len(set(index.values())) != num_rows:
        raise CacheCorruptError(
            f"feature cache {path}: {INDEX} maps {len(index)} images to {len(set(index.values()))} distinct rows, "
            f"but {DATA} holds {num_rows} rows"
        )
    return index


def compact_index(path: Path, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, rows)``: the keys as sorted fixed-width UTF-8 bytes and the row of each."""
    encoded = [k.encode() for k in index]
    if any(b"\0" in k for k in encoded):  # fixed-width bytes could not tell "a" from "a\0"
        bad = next(k for k in index if "\0" in k)
        raise CacheCorruptError(f"feature cache {path}: {INDEX} lists image {bad!r}, a key holding a NUL character")
    keys = np.array(encoded, dtype=bytes) if encoded else np.empty(0, dtype="S1")
    rows = np.fromiter(index.values(), dtype=np.int64, count=len(index))
    order = np.argsort(keys, kind="stable")
    return keys[order], rows[order]


def check_array(path: Path, shape: tuple[int, ...], dtype: np.dtype, name: str = DATA) -> int:
    """Header of ``name`` agrees with ``meta.json`` and the file is as long as the header says; returns the
    data offset."""
    file = path / name
    try:
        got_shape, got_dtype, offset = read_header(file)
        size = file.stat().st_size
    except (OSError, ValueError) as e:
        raise CacheCorruptError(f"feature cache {path}: unreadable {name} ({type(e).__name__}: {e})") from e
    if got_shape != shape or got_dtype != dtype:
        raise CacheCorruptError(
            f"feature cache {path}: {name} holds {got_shape} {got_dtype.name}, {META} says {shape} {dtype.name}"
        )
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise CacheCorruptError(
            f"feature cache {path}: {name} is {'truncated' if size < expected else 'too long'}: "
            f"{size} bytes, expected {expected} for {shape} {dtype.name}"
        )
    return offset
