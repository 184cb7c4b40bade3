"""Feature cache: cached features equal online ones, fingerprints, keys, worker-safe reads, shards, CLI."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from cache_helpers import make_images, online, tiny_encoder
from torch.utils.data import DataLoader, Dataset

from fusion.data.cache import (
    CacheKeyError,
    FeatureCache,
    FingerprintMismatchError,
    build_cache,
    cache_fingerprint,
    cache_path,
    ensure_cache,
    images_of,
    merge_shards,
    shard_keys,
)
from fusion.data.cache.__main__ import main as cli
from fusion.tasks.base import Example

FAST = dict(batch_size=3, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def enc():
    return tiny_encoder("clip_tiny")


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "img")


def test_fp32_cache_equals_online_features_exactly(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", dtype="float32", **FAST)
    keys = sorted(images)
    assert cache.shape == (len(keys), enc.num_tokens, enc.embed_dim)  # (N, T, D)
    assert cache.path == cache_path(tmp_path / "cache", cache_fingerprint(enc, "float32"))
    # Same batches as the build (3 at a time, sorted keys): bit-identical.
    for i in range(0, len(keys), 3):
        got = cache.get(keys[i : i + 3])
        assert got.dtype == torch.float32 and torch.equal(got, online(enc, images, keys[i : i + 3]))
    # Any order and repeats, one key at a time.
    pick = [keys[4], keys[0], keys[4]]
    assert torch.equal(cache.get(pick), torch.stack([cache[k] for k in pick]))


def test_fp16_cache_is_the_online_features_rounded(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)  # float16 by default
    keys = sorted(images)
    got, ref = cache.get(keys), online(enc, images, keys)
    assert got.dtype == torch.float16 and cache.dtype == np.float16
    assert torch.equal(got, ref.half())
    torch.testing.assert_close(cache.get(keys, dtype=torch.float32), ref, rtol=1e-3, atol=1e-3)


def test_layout_on_disk_and_reads_are_memory_mapped(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    assert sorted(p.name for p in cache.path.iterdir()) == [
        "COMPLETE", "checksums.npy", "features.npy", "index.json", "meta.json"
    ]
    assert cache.path.name.startswith("clip_tiny-")
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["fingerprint"]["sha256"] == enc.fingerprint()["sha256"] and meta["fingerprint"]["dtype"] == "float16"
    assert meta["fingerprint"]["preprocess"]["input_size"] == [32, 32]
    assert meta["shape"] == [len(images), 17, 64]
    assert np.load(cache.path / "features.npy", mmap_mode="r").shape == (len(images), 17, 64)
    assert isinstance(cache.array().base, np.memmap) or isinstance(cache.array(), np.memmap)
    # Nothing hidden (partial builds, trash) left behind in the root besides the lock file.
    assert sorted(p.name for p in cache.path.parent.iterdir()) == sorted([cache.path.name, f".{cache.path.name}.lock"])


def test_second_ensure_opens_without_encoding(enc, images, tmp_path):
    first = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    calls = []
    again = ensure_cache(enc, images, tmp_path / "cache", on_batch=calls.append, **FAST)
    assert again.path == first.path and calls == []
    # A subset of the cached images is served by the same cache.
    sub = dict(list(images.items())[:3])
    assert ensure_cache(enc, sub, tmp_path / "cache", on_batch=calls.append, **FAST).path == first.path and not calls


def test_missing_key_names_key_and_folder(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    with pytest.raises(CacheKeyError, match=rf"'set/nope' is not in feature cache {cache.path}"):
        cache.get(["set/000", "set/nope"])
    # The sorted fixed-width key array never matches a prefix, an extension or a NUL-padded form of a key.
    near = ["set/00", "set/0000", "set/000\0", "", "set/006x"]
    assert cache.missing(["set/006", *near, "set/000"]) == near and "set/006" in cache
    assert not any(k in cache for k in near)
    with pytest.raises(CacheKeyError, match=r"'set/000\\x00' is not in .*\(1 of the 2 requested keys missing"):
        cache.get(["set/001", "set/000\0"])


def test_cache_lacking_requested_images_is_extended_or_refused(enc, images, tmp_path):
    first = dict(list(images.items())[:3])
    old = ensure_cache(enc, first, tmp_path / "cache", dtype="float32", **FAST)
    old_rows = old.get(sorted(first)).clone()
    with pytest.raises(CacheKeyError, match="lacks 4 of the 7 requested images"):
        ensure_cache(enc, images, tmp_path / "cache", dtype="float32", rebuild=False, **FAST)
    encoded = []
    grown = ensure_cache(enc, images, tmp_path / "cache", dtype="float32", on_batch=encoded.append, **FAST)
    # Only the 4 new images went through the encoder (batches of 3: rows 3 -> 6 -> 7); the old rows were copied.
    assert encoded == [6, 7] and len(grown) == len(images) and grown.path == old.path
    assert torch.equal(grown.get(sorted(first)), old_rows)
    keys = sorted(images)
    torch.testing.assert_close(grown.get(keys), online(enc, images, keys), rtol=0, atol=0)
    # The grown cache serves both image sets without encoding anything.
    for wanted in (first, images):
        assert ensure_cache(enc, wanted, tmp_path / "cache", dtype="float32", on_batch=encoded.append, **FAST)
    assert encoded == [6, 7]


def test_interrupted_build_never_resumes_into_another_row_order(enc, images, tmp_path):
    """A cache of 3 images, then a forced full (sorted) build of all 7 interrupted, then an extension of the
    3-image cache to the same 7: same image set, other row order, so it must not resume the full build."""
    root = tmp_path / "cache"
    late = sorted(images)[-3:]  # cached first: the extension's rows start with these, then the other 4
    build_cache(enc, {k: images[k] for k in late}, root, dtype="float32", **FAST)

    class Stop(Exception):
        pass

    def stop_after_first(rows: int) -> None:
        raise Stop

    with pytest.raises(Stop):  # leaves a partial build of all 7 with its first batch (sorted order) done
        build_cache(enc, images, root, dtype="float32", force=True, sync_every=0, on_batch=stop_after_first, **FAST)
    cache = ensure_cache(enc, images, root, dtype="float32", **FAST)
    assert cache.keys[:3] == late
    keys = sorted(images)
    torch.testing.assert_close(cache.get(keys), online(enc, images, keys), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("override", "field"),
    [({"init_seed": 7}, "sha256"), ({"layer": 0}, "layer")],
)
def test_other_encoder_config_is_refused_naming_the_field(enc, images, tmp_path, override, field):
    old = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    other = tiny_encoder("clip_tiny", **override)
    with pytest.raises(FingerprintMismatchError, match=rf"{old.path}.*{field}: cached .*, configured ") as err:
        ensure_cache(other, images, tmp_path / "cache", rebuild=False, **FAST)
    cached, configured = old.fingerprint[field], cache_fingerprint(other)[field]
    assert repr(cached) in str(err.value) and repr(configured) in str(err.value)
    # Opening the old folder for the new encoder directly is refused the same way.
    with pytest.raises(FingerprintMismatchError, match=f"{field}: cached"):
        FeatureCache(old.path, cache_fingerprint(other))
    # rebuild=True builds the new configuration's own cache beside the old one.
    new = ensure_cache(other, images, tmp_path / "cache", **FAST)
    assert new.path != old.path and new.fingerprint[field] == configured


@pytest.mark.parametrize(
    ("field", "value"),
    [("input_size", (48, 48)), ("mean", (0.5, 0.5, 0.5)), ("std", (0.25, 0.25, 0.25)), ("interpolation", "bilinear")],
    ids=["size", "mean", "std", "interpolation"],
)
def test_other_preprocessing_is_refused_naming_the_field(enc, images, tmp_path, field, value):
    old = ensure_cache(enc, images, tmp_path / "cache", dtype="float32", **FAST)
    other = tiny_encoder("clip_tiny")  # same weights and layer: only the preprocessing differs
    other.preprocess = replace(other.preprocess, **{field: value})
    cached, configured = old.fingerprint["preprocess"][field], list(value) if isinstance(value, tuple) else value
    values = f"cached {cached!r}, configured {configured!r}"
    with pytest.raises(FingerprintMismatchError, match=rf"{old.path}.*preprocess\.{field}: {re.escape(values)}"):
        ensure_cache(other, images, tmp_path / "cache", dtype="float32", rebuild=False, **FAST)
    with pytest.raises(FingerprintMismatchError, match=rf"preprocess\.{field}: cached"):
        FeatureCache(old.path, cache_fingerprint(other, "float32"))
    if field == "interpolation":  # rebuild=True: a cache of the new preprocessing beside the old one
        new = ensure_cache(other, images, tmp_path / "cache", dtype="float32", **FAST)
        keys = sorted(images)
        assert new.path != old.path and new.fingerprint["preprocess"][field] == value
        assert torch.equal(new.get(keys), online(other, images, keys))
        assert not torch.equal(new.get(keys), old.get(keys))  # the pixels, hence the features, differ
        assert torch.equal(FeatureCache(old.path).get(keys), old.get(keys))  # the old cache is left as it was


def test_dtype_is_part_of_the_fingerprint(enc, images, tmp_path):
    a = ensure_cache(enc, images, tmp_path / "cache", dtype="float16", **FAST)
    b = ensure_cache(enc, images, tmp_path / "cache", dtype="fp32", **FAST)
    assert a.path != b.path and (a.dtype, b.dtype) == (np.float16, np.float32)


class _Features(Dataset):
    def __init__(self, cache: FeatureCache, keys: list[str]) -> None:
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.cache[self.keys[i]], self.cache._pid


def test_reader_is_picklable_and_maps_per_worker(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", dtype="float32", **FAST)
    keys = sorted(images)
    expected = cache.get(keys)  # maps the file in this process before the workers fork
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000  # no array bytes travel
    assert torch.equal(pickle.loads(blob).get(keys), expected)
    loader = DataLoader(_Features(cache, keys), batch_size=2, num_workers=2)
    feats, pids = zip(*loader, strict=True)
    assert torch.equal(torch.cat(feats), expected)
    worker_pids = {int(p) for batch in pids for p in batch}
    assert len(worker_pids) >= 1 and cache._pid not in worker_pids  # each worker mapped the file itself


def test_worker_batches_are_read_straight_into_shared_memory(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", dtype="float16", **FAST)
    keys = sorted(images)
    assert not cache.get(keys).is_shared()  # in the main process: ordinary memory
    # In a worker the batch is allocated in shared memory before it is filled, so handing it to the training
    # process does not copy it again (torch would move ordinary memory into shared memory first).
    loader = DataLoader(keys, batch_size=3, num_workers=2, collate_fn=lambda batch: (cache.get(batch),
                        cache.get(batch).is_shared()))
    batches = list(loader)
    assert all(shared for _, shared in batches)
    assert torch.equal(torch.cat([b for b, _ in batches]), cache.get(keys))


def test_sharded_build_and_merge_equal_unsharded(enc, images, tmp_path):
    whole = build_cache(enc, images, tmp_path / "whole", dtype="float32", **FAST)
    root = tmp_path / "sharded"
    parts = [build_cache(enc, images, root, dtype="float32", shard=i, num_shards=3, **FAST) for i in range(3)]
    assert [len(p) for p in parts] == [2, 2, 3]
    assert sorted(k for p in parts for k in p.keys) == sorted(images)
    merged = merge_shards(root, cache_fingerprint(enc, "float32"), 3)
    assert merged.path.name == whole.path.name and merged.keys == whole.keys
    assert (merged.path / "features.npy").read_bytes() == (whole.path / "features.npy").read_bytes()
    # The merge recomputed the checksums as it copied the rows: the same as the unsharded build's.
    assert (merged.path / "checksums.npy").read_bytes() == (whole.path / "checksums.npy").read_bytes()
    assert merged.meta["integrity"] == whole.meta["integrity"] and merged.verify() == len(images)
    assert not any(p.exists() for p in (x.path for x in parts))  # shards removed after the merge


def test_ensure_merges_finished_shards(enc, images, tmp_path):
    for i in range(2):
        build_cache(enc, images, tmp_path, shard=i, num_shards=2, **FAST)
    calls = []
    cache = ensure_cache(enc, images, tmp_path, on_batch=calls.append, **FAST)
    assert calls == [] and cache.meta["merged_from"] == 2 and len(cache) == len(images)


def test_shards_of_more_images_than_requested_are_merged_whole(enc, images, tmp_path):
    """Extract every split in shards, then evaluate on one split: the shards merge, nothing is encoded."""
    parts = [build_cache(enc, images, tmp_path, dtype="float32", shard=i, num_shards=2, **FAST) for i in range(2)]
    one_split = {k: images[k] for k in sorted(images)[2:5]}  # spans both shards
    calls = []
    cache = ensure_cache(enc, one_split, tmp_path, dtype="float32", on_batch=calls.append, **FAST)
    assert calls == [] and cache.meta["merged_from"] == 2
    assert cache.keys == sorted(images)  # all the shards' images, in the unsharded order
    keys = sorted(images)
    assert torch.equal(cache.get(keys), online(enc, images, keys))
    assert not any(p.path.exists() for p in parts)
    # A later request for the other images is served by the merged cache as it is.
    assert ensure_cache(enc, images, tmp_path, dtype="float32", on_batch=calls.append, **FAST).path == cache.path
    assert calls == []


def test_shards_lacking_requested_images_are_not_merged(enc, images, tmp_path, caplog):
    extracted = {k: images[k] for k in sorted(images)[:5]}
    parts = [build_cache(enc, extracted, tmp_path, dtype="float32", shard=i, num_shards=2, **FAST) for i in range(2)]
    fp = cache_fingerprint(enc, "float32")
    lacking = r"cannot merge the shards of .*/clip_tiny-\w+: they hold 5 images but lack 2 of the 7 requested "
    with pytest.raises(CacheKeyError, match=lacking + r"\(first: 'set/005', 'set/006'\)"):
        merge_shards(tmp_path, fp, 2, keys=sorted(images))
    assert not cache_path(tmp_path, fp).exists() and all(p.path.exists() for p in parts)  # nothing written
    calls = []
    with caplog.at_level("WARNING", logger="fusion.data.cache.build"):
        cache = ensure_cache(enc, images, tmp_path, dtype="float32", on_batch=calls.append, **FAST)
    assert "lack 2 of the 7 requested" in caplog.text and "building it whole" in caplog.text
    assert calls == [3, 6, 7] and "merged_from" not in cache.meta  # built whole from the images, as before
    keys = sorted(images)
    assert torch.equal(cache.get(keys), online(enc, images, keys))


def test_shard_partition_is_deterministic_and_complete():
    keys = [f"k{i}" for i in range(10)]
    shards = [shard_keys(reversed(keys), i, 4) for i in range(4)]
    assert sum(shards, []) == sorted(keys) and [len(s) for s in shards] == [2, 3, 2, 3]
    with pytest.raises(ValueError, match="shard=4 is out of range"):
        shard_keys(keys, 4, 4)


def test_images_of_examples_dedupes_shared_images(tmp_path):
    ex = [Example(str(i), f"img/{i % 2}", tmp_path / f"{i % 2}.png", "q?") for i in range(5)]
    assert images_of(ex) == {"img/0": tmp_path / "0.png", "img/1": tmp_path / "1.png"}
    with pytest.raises(ValueError, match="'img/0' names two files"):
        images_of([*ex, Example("9", "img/0", tmp_path / "other.png", "q?")])


def test_cli_build_and_info(images, tmp_path, capsys):
    folder = next(iter(images.values())).parent
    cli(["build", "--encoder", "vit_tiny", "--image-dir", str(folder), "--key-prefix", "set/",
         "--root", str(tmp_path / "cache"), "--workers", "0", "--dtype", "float32"])
    path = capsys.readouterr().out.split()[0]
    cache = FeatureCache(path)
    assert sorted(cache.keys) == sorted(images) and cache.fingerprint["name"] == "vit_tiny"
    torch.testing.assert_close(cache.get(["set/001"]), online(tiny_encoder("vit_tiny"), images, ["set/001"]))
    cli(["info", path])
    assert json.loads(capsys.readouterr().out)["shape"] == [len(images), 17, 64]


def test_cli_build_progress_in_a_batch_log(images, tmp_path):
    """``python -m fusion.data.cache build ... > log 2>&1``, as a SLURM job runs it: progress comes as log
    lines with the count and the rate, never as one line redrawn with carriage returns."""
    folder = next(iter(images.values())).parent
    proc = subprocess.run(
        [sys.executable, "-m", "fusion.data.cache", "build", "--encoder", "vit_tiny", "--image-dir", str(folder),
         "--root", str(tmp_path / "cache"), "--workers", "0"],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = proc.stdout + proc.stderr
    assert "\r" not in log
    assert re.search(rf"fusion.counter: cache vit_tiny-\w+: 0/{len(images)} img \(0%\)", log), log
    assert re.search(rf"cache vit_tiny-\w+: {len(images)}/{len(images)} img \(100%\) \| [\d.]+img/s", log), log
