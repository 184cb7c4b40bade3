"""The on-disk layout of one published cache and its reader.

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

Folders are only ever published by an atomic rename of a finished temporary folder (see
:mod:`fusion.data.cache.writer`), so a folder with this name is complete unless someone damaged it; opening
still checks the marker, the array's size against its header and the index against the array, so a
damaged cache fails loudly instead of being read.

Damage that keeps the files consistent (``index.json`` mapping keys to other rows, ``features.npy``
overwritten in place) is what the checksums catch. Opening checks the whole index (one sha256 over the
keys in row order: as cheap as parsing ``index.json``) and ``SAMPLE_ROWS`` evenly spaced rows of the
array (a bounded read, whatever the cache's size: a zeroed or replaced file fails here); batches are then
read unchecked, as hashing every row read would cost several times the read itself in every DataLoader
worker. :meth:`FeatureCache.verify` (``python -m fusion.data.cache verify <folder>``) checks every row, and
rows copied into a new cache (extending it, merging shards) are checked as they are copied. Caches built
before checksums existed (no ``integrity`` in ``meta.json``) still open, with a one-time warning that
they cannot be verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info
from tqdm.auto import tqdm

from fusion.data.cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheKeyError,
    CacheNotFoundError,
    CacheUnverifiableError,
    FingerprintMismatchError,
)
from fusion.data.cache.fingerprint import describe_diff
from fusion.data.cache.storage import SCALES, STORAGES, Storage, dequantise, float8_supported, storage_of

DATA = "features.npy"
INDEX = "index.json"
META = "meta.json"
CHECKSUMS = "checksums.npy"
COMPLETE = "COMPLETE"
# Rows whose checksums opening a cache checks (evenly spaced, first and last included): a bounded read.
SAMPLE_ROWS = 64
CHECKSUM_ALGORITHM = "blake2b-64"
CHECKSUM_COLUMNS = ["key", "key NUL row bytes"]
# Rows are verified in reads of about this many bytes (bounded memory whatever the row size).
_VERIFY_CHUNK_BYTES = 64 * 2**20

log = logging.getLogger(__name__)
_warned_unverifiable: set[Path] = set()  # caches without checksums already warned about in this process


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


class FeatureCache:
    """Read-only view of one published cache: image keys -> ``(B, T, D)`` feature tensors.

    Opening validates the files and reads the metadata and the index, never the array. The index is then
    held as two arrays, the keys sorted as fixed-width UTF-8 bytes and their rows, looked up with
    ``np.searchsorted``: (longest key + 8) bytes per image, not a ``str``, an ``int`` and a dict slot
    (which every DataLoader worker would also hold, for every encoder, with refcount writes copying the
    pages a fork shared; array pages are only read). :meth:`get`
    reads only the requested rows, with positioned reads (``os.preadv``) straight into the batch's
    array: no mapping, so the rows read never stay resident in the process (a memory map keeps every
    page it touched in the reader's RSS until unmapped, so an epoch over a 100k-image cache would hold
    the whole file there). The file is opened lazily, once per process; pickling drops the descriptor,
    so the object can go to DataLoader workers (fork or spawn) and each worker opens the file itself.
    :meth:`array` still maps the whole file, for bulk copies (merging shards) and inspection.

    Opening also checks the index against the checksums and ``check_rows`` evenly spaced rows of the
    array (0: none); :meth:`verify` checks every row (see the module docstring for why reads do not).
    """

    def __init__(
        self, path: str | os.PathLike, fingerprint: dict[str, Any] | None = None, *, check_rows: int = SAMPLE_ROWS
    ) -> None:
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise FingerprintMismatchError(
                f"feature cache {self.path} was built for a different encoder configuration: "
                f"{describe_diff(self.meta['fingerprint'], fingerprint)}"
            )
        self.shape: tuple[int, int, int] = tuple(self.meta["shape"])  # (N, T, D)
        self.storage: Storage = storage_of(self.meta["dtype"])
        if self.storage.name == "float8_e4m3fn" and not float8_supported():
            raise CacheError(
                f"feature cache {self.path} stores float8_e4m3fn rows, which this torch ({torch.__version__}) "
                "cannot read; use a torch with float8 support or rebuild the cache with cache.dtype=int8"
            )
        self.dtype = self.storage.file_dtype  # of features.npy (int8 / uint8 for quantised caches)
        # index.json's {key: row} as sorted keys (S<longest>) + their rows: no Python object per image.
        self._sorted_keys, self._sorted_rows = _compact(self.path, _read_index(self.path, self.shape[0]))
        self._offset = _check_array(self.path, self.shape, self.dtype)
        self._row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self._scales_offset = (
            _check_array(self.path, self.shape[:2], np.dtype(np.float16), SCALES) if self.storage.quantised else 0
        )
        self._fds: dict[str, int] = {}
        self._pid: int | None = None  # the process that opened ``_fds``
        self._array: np.ndarray | None = None
        self._array_pid: int | None = None
        if self.verifiable:
            table, keys = self.checksums(), self._keys_in_rows()
            self._check_index(keys, table)
            if check_rows:
                rows = sample_rows(len(self), check_rows)
                self._check_rows(rows, row_checksums(keys[rows].tolist(), *self.read_stored(rows)), table[rows, 1])
        elif self.path not in _warned_unverifiable:
            _warned_unverifiable.add(self.path)
            log.warning("%s", self._unverifiable())

    @property
    def verifiable(self) -> bool:
        """Whether the build recorded checksums (caches built before they existed did not)."""
        return "integrity" in self.meta

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta["fingerprint"]

    @property
    def tokens_per_encoder(self) -> int | None:
        """The K patch tokens each image's grid was pooled to at build time (None: every token stored)."""
        pooling = self.fingerprint.get("pooling")
        return int(pooling["tokens_per_encoder"]) if pooling else None

    @property
    def bytes_per_image(self) -> int:
        """Feature bytes one image takes on disk (its rows, and its scales when quantised)."""
        return self.storage.row_bytes(self.shape[1], self.shape[2])

    def describe(self) -> dict[str, Any]:
        """The storage: dtype, pooling, tokens x width per image, bytes per image, files' total size."""
        total = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return {
            "dtype": self.storage.name,
            "quantised": f"per-row symmetric, float16 scales in {SCALES}" if self.storage.quantised else None,
            "pooling": self.fingerprint.get("pooling"),
            "tokens_per_encoder": self.tokens_per_encoder,
            "tokens": self.shape[1],
            "embed_dim": self.shape[2],
            "images": len(self),
            "bytes_per_image": self.bytes_per_image,
            "total_bytes": total,
            "total_mib": round(total / 2**20, 3),
        }

    @property
    def keys(self) -> list[str]:
        """Image keys in row order (a new list on each call)."""
        return [k.decode() for k in self._keys_in_rows().tolist()]

    def _keys_in_rows(self) -> np.ndarray:
        """The UTF-8 keys in row order, a fixed-width bytes array (``.tolist()`` gives the keys exactly)."""
        in_rows = np.empty_like(self._sorted_keys)
        in_rows[self._sorted_rows] = self._sorted_keys
        return in_rows

    def checksums(self) -> np.ndarray:
        """The ``(N, 2)`` uint64 checksum table of ``checksums.npy``, after checking it against ``meta.json``.

        Read from the file on each call (16 bytes per image), never held by the reader.
        """
        if not self.verifiable:
            raise CacheUnverifiableError(self._unverifiable())
        file, integrity = self.path / CHECKSUMS, self.meta["integrity"]
        if not isinstance(integrity, dict):
            raise CacheCorruptError(f"feature cache {self.path}: {META} has integrity {integrity!r}, want an object")
        try:
            blob = file.read_bytes()
        except OSError as e:
            raise CacheCorruptError(
                f"feature cache {self.path}: unreadable {CHECKSUMS} ({type(e).__name__}: {e}); {META} says the "
                "build wrote it"
            ) from e
        if hashlib.sha256(blob).hexdigest() != integrity.get("checksums_sha256"):
            raise CacheCorruptError(
                f"feature cache {self.path}: {CHECKSUMS} does not match its sha256 in {META}: it was changed "
                "after the build"
            )
        table = np.load(io.BytesIO(blob), allow_pickle=False)
        if table.shape != (len(self), 2) or table.dtype != np.dtype("<u8"):
            raise CacheCorruptError(
                f"feature cache {self.path}: {CHECKSUMS} holds {table.shape} {table.dtype}, want ({len(self)}, 2) "
                "uint64"
            )
        return table

    def verify(self, progress: bool = False) -> int:
        """Check every row of the array against its checksum; returns the number of rows checked.

        Raises :class:`CacheCorruptError` naming the file, the first rows that fail and their images, or
        :class:`CacheUnverifiableError` for a cache built without checksums. Reads about 64 MiB at a time.
        """
        table, keys = self.checksums(), self._keys_in_rows()
        self._check_index(keys, table)
        n, bad = len(self), []
        chunk = max(1, _VERIFY_CHUNK_BYTES // max(self._row_bytes, 1))
        bar = tqdm(total=n, unit="row", desc=f"verify {self.path.name}", disable=not progress, dynamic_ncols=True)
        with bar:
            for lo in range(0, n, chunk):
                rows = np.arange(lo, min(n, lo + chunk))
                got = row_checksums(keys[rows].tolist(), *self.read_stored(rows))
                bad.extend((lo + np.flatnonzero(got != table[rows, 1])).tolist())
                bar.update(len(rows))
        if bad:
            raise self._rows_error(np.array(bad), keys, n)
        return n

    def check_copied(self, start: int, checksums: np.ndarray) -> None:
        """Compare column 1 ``checksums`` recomputed from rows ``start..`` of this cache as a copy read them.

        Extending a cache and merging shards read every row anyway: this checks them at the cost of the
        hashing the new cache's own checksums need. Nothing to compare for a cache without checksums.
        """
        if not self.verifiable:
            return
        rows = np.arange(start, start + len(checksums))
        stored = np.load(self.path / CHECKSUMS, mmap_mode="r", allow_pickle=False)[rows, 1]
        self._check_rows(rows, checksums, stored)

    def _check_index(self, keys: np.ndarray, table: np.ndarray) -> None:
        """``index.json`` gives every row the key the build wrote there (one digest; rows named on failure)."""
        if order_digest(keys.tolist()) == self.meta["integrity"].get("index_digest"):
            return
        moved = np.flatnonzero(key_checksums(keys.tolist()) != table[:, 0])
        if not len(moved):
            raise CacheCorruptError(
                f"feature cache {self.path}: the keys of {INDEX} in row order do not match their digest in {META}"
            )
        r = int(moved[0])
        raise CacheCorruptError(
            f"feature cache {self.path}: {INDEX} maps image {keys[r].decode()!r} to row {r}, which the build "
            f"wrote for another image ({CHECKSUMS}); {len(moved)} of {len(self)} rows have another key, first rows: "
            f"{', '.join(map(str, moved[:5].tolist()))} ({INDEX} was changed after the build)"
        )

    def _check_rows(self, rows: np.ndarray, got: np.ndarray, stored: np.ndarray) -> None:
        """Raise naming the first of ``rows`` whose checksum ``got`` is not the ``stored`` one."""
        bad = rows[np.flatnonzero(got != stored)]
        if len(bad):
            raise self._rows_error(bad, self._keys_in_rows(), len(rows))

    def _rows_error(self, bad: np.ndarray, keys: np.ndarray, checked: int) -> CacheCorruptError:
        r = int(bad[0])
        return CacheCorruptError(
            f"feature cache {self.path}: {DATA} row {r} (image {keys[r].decode()!r}) does not match its checksum "
            f"in {CHECKSUMS}; {len(bad)} of the {checked} rows checked differ, first rows: "
            f"{', '.join(map(str, bad[:5].tolist()))} (the file was changed after the build)"
        )

    def _unverifiable(self) -> str:
        return (
            f"feature cache {self.path} has no {CHECKSUMS} (it was built before caches recorded checksums): "
            "its rows cannot be verified; rebuild it to add them (python -m fusion.data.cache build ... --force, "
            "or delete the folder and let the next run build it)"
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self._find([key])[1][0])

    def __repr__(self) -> str:
        pooled = f", tokens_per_encoder={self.tokens_per_encoder}" if self.tokens_per_encoder is not None else ""
        return f"FeatureCache({str(self.path)!r}, shape={self.shape}, dtype={self.storage.name}{pooled})"

    def array(self) -> np.ndarray:
        """The read-only ``(N, T, D)`` memory map of the whole file, mapped on first use in this process.

        For bulk, sequential copies; batches are read with :meth:`get`, which does not map the file.
        """
        if self._array is None or self._array_pid != os.getpid():
            # A mapping inherited through fork is not reused: each process maps the file itself.
            mm = np.memmap(self.path / DATA, dtype=self.dtype, mode="r", offset=self._offset, shape=self.shape)
            self._array, self._array_pid = mm.view(np.ndarray), os.getpid()
        return self._array

    def _file(self, name: str = DATA) -> int:
        """This process's read-only descriptor of the cache file ``name``, opened on first use."""
        if self._pid != os.getpid():
            # Descriptors inherited through fork are left alone (they are the parent's to close): positioned
            # reads would be safe on them, but each process opens its own, as it does after spawn.
            self._fds, self._pid = {}, os.getpid()
        if name not in self._fds:
            self._fds[name] = os.open(self.path / name, os.O_RDONLY | os.O_CLOEXEC)
        return self._fds[name]

    def close(self) -> None:
        """Close this process's descriptors and mapping (reopened by the next read)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds, self._pid = {}, None
        self._array = self._array_pid = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def _find(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, found)`` of ``keys``, both ``(B,)``; ``rows`` is meaningless where ``found`` is False."""
        encoded = [k.encode() for k in keys]
        wanted = np.array(encoded, dtype=bytes) if encoded else np.empty(0, dtype="S1")
        if not len(self._sorted_keys):
            return np.zeros(len(keys), dtype=np.int64), np.zeros(len(keys), dtype=bool)
        # A longer query compares unequal to every stored key (numpy widens, never truncates, here).
        pos = np.minimum(np.searchsorted(self._sorted_keys, wanted), len(self._sorted_keys) - 1)
        found = self._sorted_keys[pos] == wanted
        if found.any():
            # Fixed-width bytes ignore trailing NULs ("a" == "a\0"); stored keys never hold a NUL (see
            # _compact), so a query that does is not in the cache.
            found &= np.array([b"\0" not in k for k in encoded])
        return self._sorted_rows[pos], found

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key, ``(B,)`` int64; an unknown key raises :class:`CacheKeyError` naming it."""
        rows, found = self._find(keys)
        if not found.all():
            missing = np.flatnonzero(~found)
            raise CacheKeyError(
                f"image key {keys[missing[0]]!r} is not in feature cache {self.path} "
                f"({len(missing)} of the {len(keys)} requested keys missing; the cache holds {len(self)} images)"
            )
        return rows

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys of ``keys`` that this cache does not hold, in their order."""
        keys = list(keys)
        _, found = self._find(keys)
        return [k for k, ok in zip(keys, found.tolist(), strict=True) if not ok]

    def get(self, keys: Sequence[str], dtype: torch.dtype | None = None) -> Tensor:
        """Features of ``keys`` as one ``(B, T, D)`` tensor (the cache's read dtype unless ``dtype``).

        The rows are read from the file straight into one fresh array, which the tensor then shares
        (one copy, from the page cache; runs of consecutive rows in one read); a cast to ``dtype`` is
        better left to the device the model runs on. A quantised cache reads only the batch's rows and
        scales the same way and dequantises them into float16 (or straight into float32 with
        ``dtype=torch.float32``: exactly ``q * scale``).
        """
        rows = self.rows(keys)
        shape = (len(rows), *self.shape[1:])
        if not self.storage.quantised:
            tensor = _empty(shape, self.storage.read_dtype)
            self._read_rows(rows, tensor.numpy())
            return tensor if dtype is None else tensor.to(dtype)
        into = dtype if dtype in (torch.float16, torch.float32) else self.storage.read_dtype
        tensor = dequantise(*self.read_stored(rows), self.storage, _empty(shape, into))
        return tensor if dtype is None or dtype == into else tensor.to(dtype)

    def read_stored(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``rows`` as stored: ``((B, T, D)`` in the file's dtype, ``(B, T)`` float16 scales or None),
        for copies into another cache and checksums (no dequantisation)."""
        data = self._read_rows(rows)
        if not self.storage.quantised:
            return data, None
        scales = np.empty((len(rows), self.shape[1]), dtype=np.float16)
        _read_runs(self._file(SCALES), rows, scales, self._scales_offset, self.shape[1] * 2,
                   f"feature cache {self.path}: {SCALES}")
        return data, scales

    def _read_rows(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``rows`` of the array into ``out`` (a new ``(B, T, D)`` array if None); runs in one read each."""
        if out is None:
            out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        _read_runs(self._file(), rows, out, self._offset, self._row_bytes, f"feature cache {self.path}: {DATA}")
        return out

    def __getitem__(self, key: str) -> Tensor:
        """``(T, D)`` features of one image."""
        return self.get([key])[0]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": None, "_array": None, "_array_pid": None}


def _read_runs(fd: int, rows: np.ndarray, out: np.ndarray, offset: int, size: int, what: str) -> None:
    """Rows ``rows`` (of ``size`` bytes each, from byte ``offset`` of ``fd``) into ``out``; runs in one read."""
    if not len(rows):
        return
    buf = memoryview(out.reshape(-1)).cast("B")
    starts = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip([0, *starts.tolist()], [*starts.tolist(), len(rows)], strict=True):
        read_into(fd, buf[lo * size : hi * size], offset + int(rows[lo]) * size, what)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory from the start (as torch's own
    collate allocates), so the batch reaches the training process without being copied again."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _read_meta(path: Path) -> dict[str, Any]:
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


def _read_index(path: Path, num_rows: int) -> dict[str, int]:
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


def _compact(path: Path, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, rows)``: the keys as sorted fixed-width UTF-8 bytes and the row of each."""
    encoded = [k.encode() for k in index]
    if any(b"\0" in k for k in encoded):  # fixed-width bytes could not tell "a" from "a\0"
        bad = next(k for k in index if "\0" in k)
        raise CacheCorruptError(f"feature cache {path}: {INDEX} lists image {bad!r}, a key holding a NUL character")
    keys = np.array(encoded, dtype=bytes) if encoded else np.empty(0, dtype="S1")
    rows = np.fromiter(index.values(), dtype=np.int64, count=len(index))
    order = np.argsort(keys, kind="stable")
    return keys[order], rows[order]


def _check_array(path: Path, shape: tuple[int, ...], dtype: np.dtype, name: str = DATA) -> int:
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
