"""Feature cache integrity: build-time checksums catch a remapped index or overwritten features, on opening
(the whole index, a sample of rows), when rows are copied (extending, merging) and with ``verify`` (every row)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cache_helpers import make_images, online, run_cli, tiny_encoder

from fusion.data.cache import (
    CacheCorruptError,
    CacheUnverifiableError,
    FeatureCache,
    build_cache,
    cache_fingerprint,
    cache_path,
    ensure_cache,
    merge_shards,
)
from fusion.data.cache.__main__ import main as cli
from fusion.data.cache.files import SAMPLE_ROWS, key_checksums, row_checksums, sample_rows

FAST = dict(batch_size=4, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def enc():
    return tiny_encoder("clip_tiny")


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "img")


def _damage_row(cache: FeatureCache, row: int) -> None:
    """Change one row of ``features.npy`` in place (the file keeps its size and header)."""
    arr = np.load(cache.path / "features.npy", mmap_mode="r+")
    arr[row] = arr[row] + 1
    arr.flush()
    del arr


def _unsampled_row(num_rows: int) -> int:
    return next(r for r in range(num_rows) if r not in set(sample_rows(num_rows).tolist()))


def test_checksums_bind_each_row_to_its_key(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    keys = [k.encode() for k in cache.keys]
    table = cache.checksums()
    assert table.shape == (len(images), 2) and table.dtype == np.uint64
    assert np.array_equal(table[:, 0], key_checksums(keys))
    assert np.array_equal(table[:, 1], row_checksums(keys, np.asarray(cache.array())))
    # The same bytes under another key give another checksum: a row read for the wrong image fails.
    assert row_checksums([keys[1]], cache.array()[:1])[0] != table[0, 1]
    assert cache.verify() == len(images)
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["integrity"]["checksums"] == "checksums.npy" and meta["integrity"]["algorithm"] == "blake2b-64"


def test_index_mapping_keys_to_other_rows_is_refused_then_rebuilt(enc, images, tmp_path):
    root = tmp_path / "cache"
    cache = ensure_cache(enc, images, root, dtype="float32", **FAST)
    index = json.loads((cache.path / "index.json").read_text())
    index["set/002"], index["set/005"] = index["set/005"], index["set/002"]  # still a valid permutation
    (cache.path / "index.json").write_text(json.dumps(index))
    expected = (rf"feature cache {cache.path}: index.json maps image 'set/00[25]' to row [25], which the build wrote "
                r"for another image \(checksums.npy\); 2 of 7 rows have another key, first rows: 2, 5")
    with pytest.raises(CacheCorruptError, match=expected):
        FeatureCache(cache.path)
    with pytest.raises(CacheCorruptError, match=r"index.json maps .*pass rebuild=True"):
        ensure_cache(enc, images, root, dtype="float32", rebuild=False, **FAST)
    rebuilt = ensure_cache(enc, images, root, dtype="float32", **FAST)
    keys = sorted(images)
    assert rebuilt.path == cache.path and torch.equal(rebuilt.get(keys), online(enc, images, keys))


def test_features_overwritten_in_place_are_refused_then_rebuilt(enc, images, tmp_path):
    root = tmp_path / "cache"
    cache = ensure_cache(enc, images, root, **FAST)
    arr = np.load(cache.path / "features.npy", mmap_mode="r+")
    arr[:] = 0  # zeroed in place: size, header, index all still agree
    arr.flush()
    del arr
    with pytest.raises(CacheCorruptError, match=rf"feature cache {cache.path}: features.npy row 0 \(image 'set/000'\) "
                       r"does not match its checksum in checksums.npy; 7 of the 7 rows checked differ"):
        FeatureCache(cache.path)
    with pytest.raises(CacheCorruptError, match=r"features.npy row 0 .*pass rebuild=True"):
        ensure_cache(enc, images, root, rebuild=False, **FAST)
    rebuilt = ensure_cache(enc, images, root, **FAST)
    keys = sorted(images)
    assert torch.equal(rebuilt.get(keys), online(enc, images, keys).half()) and rebuilt.verify() == 7


def test_opening_checks_a_sample_and_verify_checks_every_row(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    _damage_row(cache, 3)
    with pytest.raises(CacheCorruptError, match=r"row 3 \(image 'set/003'\)"):  # 7 rows: the sample is all of them
        FeatureCache(cache.path)
    sampled = FeatureCache(cache.path, check_rows=2)  # rows 0 and 6 only: the damage goes unseen on opening
    with pytest.raises(CacheCorruptError, match=r"features.npy row 3 \(image 'set/003'\) does not match its checksum "
                       r"in checksums.npy; 1 of the 7 rows checked differ, first rows: 3 "):
        sampled.verify()


def test_changed_or_missing_checksums_file_is_named(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    table = np.load(cache.path / "checksums.npy")
    table[4, 1] ^= 1
    np.save(cache.path / "checksums.npy", table)
    with pytest.raises(CacheCorruptError, match=rf"{cache.path}: checksums.npy does not match its sha256 in meta.json"):
        FeatureCache(cache.path)
    (cache.path / "checksums.npy").unlink()
    with pytest.raises(CacheCorruptError, match=r"unreadable checksums.npy .*meta.json says the build wrote it"):
        FeatureCache(cache.path)


def test_cache_built_without_checksums_opens_with_a_warning(enc, images, tmp_path, caplog):
    """A cache as builds wrote them before checksums (no checksums.npy, no integrity entry) stays usable."""
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    keys = sorted(images)
    before = cache.get(keys)
    (cache.path / "checksums.npy").unlink()
    meta = json.loads((cache.path / "meta.json").read_text())
    del meta["integrity"]
    (cache.path / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="fusion.data.cache.store"):
        old = FeatureCache(cache.path, cache.fingerprint)
        FeatureCache(cache.path)  # warned once per cache and process
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"{cache.path} has no checksums.npy" in warnings[0]
    assert "cannot be verified" in warnings[0] and "--force" in warnings[0]
    assert not old.verifiable and torch.equal(old.get(keys), before)
    with pytest.raises(CacheUnverifiableError, match="cannot be verified"):
        old.verify()
    with pytest.raises(SystemExit, match=rf"error: feature cache {cache.path} has no checksums.npy"):
        cli(["verify", str(cache.path)])
    # Rebuilding it (build --force) adds them.
    assert build_cache(enc, images, tmp_path / "cache", force=True, **FAST).verify() == len(images)


def test_verify_command_as_a_user_runs_it(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    good = run_cli("verify", str(cache.path))
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == f"ok: feature cache {cache.path}: all 7 rows match their checksums " \
                                  "(checksums.npy, index.json)"
    _damage_row(cache, 5)
    bad = run_cli("verify", str(cache.path))
    assert bad.returncode == 1 and bad.stdout == ""
    assert (f"error: feature cache {cache.path}: features.npy row 5 (image 'set/005') does not match its checksum "
            "in checksums.npy; 1 of the 7 rows checked differ") in bad.stderr


def test_merge_refuses_a_damaged_shard_row_it_copies(enc, tmp_path):
    """A row the shard's opening sample skipped is caught as the merge copies it; nothing is published."""
    images = make_images(tmp_path / "img", n=SAMPLE_ROWS + 6)
    shard = build_cache(enc, images, tmp_path / "cache", shard=0, num_shards=1, batch_size=35, num_workers=0,
                        progress=False)
    row = _unsampled_row(len(shard))
    _damage_row(shard, row)
    fp = cache_fingerprint(enc)
    with pytest.raises(CacheCorruptError, match=rf"feature cache {shard.path}: features.npy row {row} \(image "
                       rf"'set/{row:03d}'\) does not match its checksum"):
        merge_shards(tmp_path / "cache", fp, 1)
    assert not cache_path(tmp_path / "cache", fp).exists() and shard.path.exists()


def test_extending_a_cache_with_a_damaged_row_encodes_every_image(enc, tmp_path, caplog):
    more = make_images(tmp_path / "img", n=SAMPLE_ROWS + 7)
    images = dict(list(more.items())[:-1])
    root = tmp_path / "cache"
    opts = dict(dtype="float32", batch_size=36, num_workers=0, progress=False)
    cache = ensure_cache(enc, images, root, **opts)
    row = _unsampled_row(len(cache))
    _damage_row(cache, row)
    encoded = []
    with caplog.at_level("WARNING", logger="fusion.data.cache.build"):
        grown = ensure_cache(enc, more, root, on_batch=encoded.append, **opts)
    assert f"features.npy row {row} " in caplog.text and "encoding every image instead of extending it" in caplog.text
    assert encoded == [36, len(more)]  # every image, not only the new one
    keys = sorted(more)
    assert grown.keys == keys and torch.equal(grown.get(keys), online(enc, more, keys))
    assert grown.verify() == len(more)
