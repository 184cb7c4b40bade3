"""Writing one cache: a hidden temporary folder filled row by row, then published by one rename.

The temporary folder ``<root>/.<name>.partial`` sits beside the final one (same filesystem, so the
rename is atomic) and never matches a cache name: a build killed half way leaves nothing that looks
complete. It records how many rows are safely on disk (``progress.json``, written after an fdatasync of
the array), so a rerun with the same fingerprint and image set resumes there; anything else restarts.
Each row's checksum (see :mod:`fusion.data.cache.store`) is computed from the bytes as they are written (a
quantised cache's rows and their scales, written to ``scales.npy`` beside them); a resumed build
recomputes those of the rows already on disk.
Callers serialize builds of one cache with a file lock (see :mod:`fusion.data.cache.build`); the rename
stays safe without it, as a folder cannot be renamed onto a non-empty one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion.data.cache.errors import CacheWriteError
from fusion.data.cache.files import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_COLUMNS,
    CHECKSUMS,
    COMPLETE,
    DATA,
    INDEX,
    META,
    checksum_file_bytes,
    key_checksums,
    order_digest,
    read_header,
    read_into,
    row_checksums,
)
from fusion.data.cache.storage import SCALES, storage_of
from fusion.io import write_bytes, write_json

PROGRESS = "progress.json"
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be made in it; else :class:`CacheWriteError`.

    A real attempt rather than ``os.access``: root passes ``access`` on read-only mounts too.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CacheWriteError(
            e.errno, f"feature cache folder {folder} is not writable ({e.strerror or e}); "
            "point the cache at a writable folder (paths.cache_dir / FUSION_CACHE_DIR)"
        ) from e


def is_disk_error(error: BaseException) -> bool:
    """A full disk, a file-size limit or lost write permission: retrying (resuming) would fail again."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL | _NOT_WRITABLE


@contextlib.contextmanager
def disk_errors(folder: Path, nbytes: int) -> Iterator[None]:
    """Turn a full disk / file-size limit / permission error into a :class:`CacheWriteError` naming the folder."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as e:
        if e.errno in _DISK_FULL:
            free = shutil.disk_usage(folder).free if folder.exists() else 0
            raise CacheWriteError(
                e.errno, f"no space to build feature cache {folder}: it needs {nbytes / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB free ({e.strerror or e}); nothing was published"
            ) from e
        if e.errno in _NOT_WRITABLE:
            raise CacheWriteError(e.errno, f"feature cache folder {folder} is not writable ({e.strerror})") from e
        raise


class PartialCache:
    """The temporary folder of one cache being built; ``keys`` are in row order.

    ``meta`` is the final ``meta.json`` content (fingerprint, ``shape`` (N, T, D), ``dtype``, digests);
    :meth:`finish` adds its ``integrity`` entry. ``checksums`` is the ``(N, 2)`` table filled as rows are written.
    """

    def __init__(self, final: Path, meta: dict[str, Any], keys: Sequence[str]) -> None:
        self.final = Path(final)
        self.tmp = self.final.parent / f".{self.final.name}.partial"
        self.meta = json.loads(json.dumps(meta))
        self.keys = list(keys)
        self._encoded = [k.encode() for k in self.keys]
        self.shape: tuple[int, int, int] = tuple(self.meta["shape"])
        self.storage = storage_of(self.meta["dtype"])
        self.dtype = self.storage.file_dtype
        if len(self.keys) != self.shape[0]:
            raise ValueError(f"{len(self.keys)} keys for {self.shape[0]} rows")
        self.row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self.scale_bytes = self.shape[1] * 2 if self.storage.quantised else 0  # one float16 per token row
        self.nbytes = self.shape[0] * (self.row_bytes + self.scale_bytes)
        self.checksums = np.zeros((self.shape[0], 2), dtype="<u8")
        self._fd: int | None = None
        self._offset = 0
        self._scales_fd: int | None = None
        self._scales_offset = 0

    def open(self, resume: bool = True) -> int:
        """Create (or, if ``resume`` and it matches, reopen) the temporary folder; returns rows already done."""
        done = self._resumable() if resume else None
        if done is not None:
            self._fd = os.open(self.tmp / DATA, os.O_RDWR)
            self._offset = read_header(self.tmp / DATA)[2]
            if self.storage.quantised:
                self._scales_fd = os.open(self.tmp / SCALES, os.O_RDWR)
                self._scales_offset = read_header(self.tmp / SCALES)[2]
            self._rehash(done)
            return done
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self._create_data()
        self._save_progress(0)
        return 0

    def write(self, start: int, rows: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Write ``rows`` (B, T, D) as stored (the file's dtype) at rows ``start..start+B``; a quantised
        cache also takes their ``(B, T)`` float16 ``scales``."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or start + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} at {start} do not fit the cache shape {self.shape}")
        if (scales is not None) != self.storage.quantised:
            raise ValueError(f"a {self.storage.name} cache takes {'' if self.storage.quantised else 'no '}scales")
        _pwrite_all(self._fd, rows, self._offset + start * self.row_bytes)
        if scales is not None:
            scales = np.ascontiguousarray(scales, dtype=np.float16)
            if scales.shape != rows.shape[:2]:
                raise ValueError(f"scales {scales.shape} for rows {rows.shape}")
            _pwrite_all(self._scales_fd, scales, self._scales_offset + start * self.scale_bytes)
        keys = self._encoded[start : start + len(rows)]
        self.checksums[start : start + len(rows), 1] = row_checksums(keys, rows, scales)

    def checkpoint(self, done: int) -> None:
        """Record that rows ``0..done`` are on disk (after syncing them), for a later resume."""
        os.fdatasync(self._fd)
        if self._scales_fd is not None:
            os.fdatasync(self._scales_fd)
        self._save_progress(done)

    def finish(self) -> None:
        """Write index, checksums, metadata and, last, the completeness marker; sync everything.

        Every row must have been written (or, resumed, read back) by then: their checksums are in ``checksums``.
        """
        for fd in (self._fd, self._scales_fd):
            if fd is not None:
                os.fsync(fd)
        self.close()
        self.checksums[:, 0] = key_checksums(self._encoded)
        table = checksum_file_bytes(self.checksums)
        write_bytes(self.tmp / CHECKSUMS, table)
        write_json(self.tmp / INDEX, {k: i for i, k in enumerate(self.keys)}, indent=None)
        integrity = {
            "checksums": CHECKSUMS,
            "algorithm": CHECKSUM_ALGORITHM,
            "columns": CHECKSUM_COLUMNS,
            "checksums_sha256": hashlib.sha256(table).hexdigest(),
            "index_digest": order_digest(self._encoded),
        }
        write_json(self.tmp / META, {**self.meta, "integrity": integrity}, indent=None)
        (self.tmp / PROGRESS).unlink(missing_ok=True)
        write_json(self.tmp / COMPLETE, {"rows": self.shape[0]}, indent=None)
        _fsync_dir(self.tmp)

    def publish(self) -> bool:
        """Rename the finished folder into place; an existing final folder is replaced.

        Returns False (and discards this build) if another process published the same name between
        our replacing step and our rename: theirs is kept, as both hold the same features.
        """
        trash = None
        if self.final.exists():
            # A stale/damaged cache being rebuilt: move it aside first (readers that mapped it keep their
            # mapping), as rename cannot replace a non-empty folder.
            trash = self.final.parent / f".{self.final.name}.trash-{uuid.uuid4().hex[:8]}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.final, trash)
        try:
            os.rename(self.tmp, self.final)
            published = True
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            self.discard()
            published = False
        _fsync_dir(self.final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return published

    def discard(self) -> None:
        """Close and delete the temporary folder (after a failure that resuming cannot fix)."""
        self.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._scales_fd is not None:
            os.close(self._scales_fd)
            self._scales_fd = None

    def _create_data(self) -> None:
        self._fd, self._offset = _create_array(self.tmp / DATA, self.shape, self.dtype)
        if self.storage.quantised:
            scales = _create_array(self.tmp / SCALES, self.shape[:2], np.dtype(np.float16))
            self._scales_fd, self._scales_offset = scales

    def _rehash(self, done: int, chunk_bytes: int = 64 * 2**20) -> None:
        """Checksums of rows ``0..done`` of a resumed build, from the bytes on disk (synced before ``done``
        was recorded), read about ``chunk_bytes`` at a time."""
        chunk = max(1, chunk_bytes // max(self.row_bytes, 1))
        for lo in range(0, done, chunk):
            hi = min(done, lo + chunk)
            rows = np.empty((hi - lo, *self.shape[1:]), dtype=self.dtype)
            read_into(self._fd, memoryview(rows.reshape(-1)).cast("B"), self._offset + lo * self.row_bytes,
                      f"partial feature cache {self.tmp}: {DATA}")
            scales = None
            if self.storage.quantised:
                scales = np.empty((hi - lo, self.shape[1]), dtype=np.float16)
                read_into(self._scales_fd, memoryview(scales.reshape(-1)).cast("B"),
                          self._scales_offset + lo * self.scale_bytes, f"partial feature cache {self.tmp}: {SCALES}")
            self.checksums[lo:hi, 1] = row_checksums(self._encoded[lo:hi], rows, scales)

    def _progress_state(self, done: int) -> dict[str, Any]:
        # The row order too: an extended cache keeps its old rows first, so the same image set can come in
        # another order than a fresh (sorted) build of it, and rows must never be resumed into wrong places.
        order = hashlib.sha256("\n".join(self.keys).encode()).hexdigest()
        return {"meta": self.meta, "rows_done": done, "row_order": order}

    def _save_progress(self, done: int) -> None:
        write_json(self.tmp / PROGRESS, self._progress_state(done), indent=None)

    def _resumable(self) -> int | None:
        """Rows done by an earlier, interrupted build of exactly this cache; None if it cannot be reused."""
        try:
            state = json.loads((self.tmp / PROGRESS).read_text())
            shape, dtype, offset = read_header(self.tmp / DATA)
            size = (self.tmp / DATA).stat().st_size
        except (OSError, ValueError):
            return None
        done = state.get("rows_done")
        expected = self._progress_state(done)
        same = all(state.get(k) == expected[k] for k in ("meta", "row_order")) and shape == self.shape
        same = same and dtype == self.dtype
        data_bytes = self.shape[0] * self.row_bytes
        if not same or not isinstance(done, int) or not 0 <= done <= self.shape[0] or size != offset + data_bytes:
            return None
        if self.storage.quantised:
            try:
                s_shape, s_dtype, s_offset = read_header(self.tmp / SCALES)
                s_size = (self.tmp / SCALES).stat().st_size
            except (OSError, ValueError):
                return None
            s_bytes = s_offset + self.shape[0] * self.scale_bytes
            if s_shape != self.shape[:2] or s_dtype != np.float16 or s_size != s_bytes:
                return None
        return done


def _create_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, int]:
    """Create the ``.npy`` file ``path`` of ``shape``/``dtype`` with every block reserved; ``(fd, data offset)``."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(os.dup(fd), "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
    total = offset + int(np.prod(shape)) * dtype.itemsize
    try:
        # Reserve every block now: a full disk fails here with ENOSPC, not half way through (and never
        # as the SIGBUS a write into a sparse memory map gets).
        os.posix_fallocate(fd, 0, total)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        os.ftruncate(fd, total)
    return fd, offset


def _pwrite_all(fd: int, array: np.ndarray, pos: int) -> None:
    view = memoryview(array.reshape(-1)).cast("B")
    while view:  # pwrite may write less than asked
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
