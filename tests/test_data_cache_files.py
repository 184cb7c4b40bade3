"""fusion.data.cache.files: a cache folder's files, their checksums and digests, and the checks on reading them."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fusion.data.cache.errors import CacheCorruptError, CacheNotFoundError
from fusion.data.cache.files import (
    COMPLETE,
    DATA,
    INDEX,
    META,
    SAMPLE_ROWS,
    check_array,
    checksum_file_bytes,
    compact_index,
    key_checksums,
    keys_digest,
    order_digest,
    read_header,
    read_index,
    read_meta,
    read_runs,
    row_checksums,
    sample_rows,
)


def _folder(tmp_path: Path, array: np.ndarray, index: dict[str, int] | None = None) -> Path:
    """A minimal complete cache folder holding ``array`` (N, T, D)."""
    folder = tmp_path / "enc-0123"
    folder.mkdir()
    np.save(folder / DATA, array)
    (folder / INDEX).write_text(json.dumps(index if index is not None else {f"k{i}": i for i in range(len(array))}))
    (folder / META).write_text(json.dumps({"shape": list(array.shape), "dtype": array.dtype.name}))
    (folder / COMPLETE).write_text("")
    return folder


def test_keys_digest_ignores_order_order_digest_does_not() -> None:
    assert keys_digest(["b", "a"]) == keys_digest(["a", "b"])
    assert keys_digest(["a", "b"]) != keys_digest(["ab"])  # keys are separated, not concatenated
    assert order_digest([b"a", b"b"]) != order_digest([b"b", b"a"])


def test_row_checksums_bind_the_key_and_cover_the_scales() -> None:
    keys = [b"k0", b"k1"]
    rows = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    plain = row_checksums(keys, rows)
    assert plain.dtype == np.dtype("<u8") and plain.shape == (2,)
    assert not np.array_equal(row_checksums(keys[::-1], rows), plain)  # a row under another key differs
    scales = np.ones((2, 3), dtype=np.float16)
    assert not np.array_equal(row_checksums(keys, rows, scales), plain)
    assert key_checksums(keys).shape == (2,) and key_checksums([]).shape == (0,)
    with pytest.raises(ValueError, match="1 keys for 2 rows"):
        row_checksums(keys[:1], rows)


def test_checksum_file_bytes_round_trip() -> None:
    table = np.array([[1, 2], [3, 2**64 - 1]], dtype=np.uint64)
    assert np.array_equal(np.load(io.BytesIO(checksum_file_bytes(table))), table)


def test_sample_rows_are_evenly_spaced_with_both_ends() -> None:
    rows = sample_rows(100_000)
    assert len(rows) == SAMPLE_ROWS and rows[0] == 0 and rows[-1] == 99_999 and len(np.unique(rows)) == len(rows)
    assert sample_rows(5).tolist() == [0, 1, 2, 3, 4] and sample_rows(0).size == 0


def test_read_header_and_runs_read_only_the_asked_rows(tmp_path: Path) -> None:
    array = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    folder = _folder(tmp_path, array)
    shape, dtype, offset = read_header(folder / DATA)
    assert (shape, dtype) == ((5, 2, 3), np.dtype(np.float32))
    rows = np.array([0, 1, 3])
    out = np.empty((3, 2, 3), dtype=np.float32)
    fd = os.open(folder / DATA, os.O_RDONLY)
    try:
        read_runs(fd, rows, out, offset, 2 * 3 * 4, "features")
    finally:
        os.close(fd)
    assert np.array_equal(out, array[rows])


def test_a_complete_folder_reads_and_checks(tmp_path: Path) -> None:
    array = np.zeros((3, 2, 4), dtype=np.float16)
    folder = _folder(tmp_path, array, {"b": 0, "a": 2, "c": 1})
    meta = read_meta(folder)
    assert meta["shape"] == [3, 2, 4]
    keys, rows = compact_index(folder, read_index(folder, 3))
    assert keys.tolist() == [b"a", b"b", b"c"] and rows.tolist() == [2, 0, 1]
    assert check_array(folder, (3, 2, 4), np.dtype(np.float16)) == read_header(folder / DATA)[2]


def test_incomplete_or_damaged_folders_are_named(tmp_path: Path) -> None:
    with pytest.raises(CacheNotFoundError, match="no feature cache"):
        read_meta(tmp_path / "absent")
    folder = _folder(tmp_path, np.zeros((2, 1, 1), dtype=np.float16))
    with pytest.raises(CacheCorruptError, match=r"index.json maps 2 images to 1 distinct rows"):
        (folder / INDEX).write_text(json.dumps({"a": 0, "b": 0}))
        read_index(folder, 2)
    with pytest.raises(CacheCorruptError, match=r"lists image 'a' at row 5"):
        (folder / INDEX).write_text(json.dumps({"a": 5, "b": 0}))
        read_index(folder, 2)
    with pytest.raises(CacheCorruptError, match="a key holding a NUL character"):
        compact_index(folder, {"a\0": 0})
    with pytest.raises(CacheCorruptError, match=r"features.npy holds \(2, 1, 1\) float16, meta.json says"):
        check_array(folder, (3, 1, 1), np.dtype(np.float16))
    with (folder / DATA).open("ab") as f:
        f.write(b"\0\0")
    with pytest.raises(CacheCorruptError, match="features.npy is too long"):
        check_array(folder, (2, 1, 1), np.dtype(np.float16))
    (folder / COMPLETE).unlink()
    with pytest.raises(CacheNotFoundError, match="incomplete"):
        read_meta(folder)
