"""Feature cache faults: empty builds, unwritable folder, full disk, damaged files, killed and concurrent builds."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import time

import pytest
import torch
from cache_helpers import make_images, online, run_cli, run_worker, tiny_encoder, write_images_json

from fusion.data.cache import (
    CacheCorruptError,
    CacheNotFoundError,
    CacheWriteError,
    FeatureCache,
    build_cache,
    cache_fingerprint,
    cache_path,
    ensure_cache,
)
from fusion.data.cache.__main__ import main as cli
from fusion.data.cache.writer import PartialCache

FAST = dict(batch_size=2, num_workers=0, progress=False, sync_every=0.0)


@pytest.fixture(scope="module")
def enc():
    return tiny_encoder("clip_tiny")


@pytest.fixture
def images(tmp_path):
    return make_images(tmp_path / "img")


def _mount_tmpfs(path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    except FileNotFoundError:
        return False
    return result.returncode == 0


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder this process cannot write to: chmod for a normal user, a read-only tmpfs for root."""
    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
    elif _mount_tmpfs(path, "ro,size=1m"):
        yield path
        subprocess.run(["umount", str(path)], check=True)
    else:
        pytest.skip("running as root without permission to mount a read-only tmpfs")


def _only_published(root):
    """Names in the cache root apart from lock files: builds in progress or trash would show here."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_cli_build_from_a_missing_or_empty_image_folder_stops_naming_it(tmp_path):
    root, empty = tmp_path / "cache", tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    (empty / "sub" / "scan.tiff").write_bytes(b"")  # not a suffix the builder reads
    cases = {
        tmp_path / "nope": f"error: image folder --image-dir {tmp_path / 'nope'} does not exist; nothing to build",
        empty: f"error: no images under --image-dir {empty} (images are files ending in .bmp, .gif, .jpeg, .jpg, "
        ".png, .webp, any case); nothing to build",
    }
    for folder, message in cases.items():
        proc = run_cli("build", "--encoder", "clip_tiny", "--image-dir", str(folder), "--root", str(root))
        assert proc.returncode == 1 and proc.stdout == "" and message in proc.stderr, proc.stderr
        assert not root.exists()  # nothing published, nothing created
    listing = tmp_path / "images.json"
    listing.write_text("{}")
    with pytest.raises(SystemExit, match=rf"error: the image list --images {listing} lists no images"):
        cli(["build", "--encoder", "clip_tiny", "--images", str(listing), "--root", str(root)])
    assert not root.exists()


def test_build_of_no_images_raises_and_writes_nothing(enc, images, tmp_path):
    """E.g. a task whose splits hold no examples; an empty shard of a non-empty image set is still built."""
    root = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"no images to cache for encoder 'clip_tiny' under {root}: the image set is "
                       r"empty .*nothing was built"):
        ensure_cache(enc, {}, root, **FAST)
    assert not root.exists()
    one = dict(list(images.items())[:1])
    shards = [build_cache(enc, one, root, shard=i, num_shards=2, **FAST) for i in range(2)]
    assert [len(s) for s in shards] == [0, 1]
    assert len(ensure_cache(enc, one, root, **FAST)) == 1  # the shards merge


def test_unwritable_cache_folder_is_named(enc, images, readonly_dir):
    with pytest.raises(CacheWriteError, match=rf"feature cache folder {readonly_dir} is not writable"):
        ensure_cache(enc, images, readonly_dir, **FAST)
    with pytest.raises(CacheWriteError, match=rf"feature cache folder {readonly_dir / 'sub'} is not writable"):
        ensure_cache(enc, images, readonly_dir / "sub", **FAST)


def test_cache_root_that_is_a_file_is_named(enc, images, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheWriteError, match="is not writable"):
        ensure_cache(enc, images, tmp_path / "file" / "cache", **FAST)


def test_file_size_cap_fails_cleanly_and_publishes_nothing(enc, images, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # 7 x 17 x 64 float32 = 30 KiB of features; a 16 KiB cap on file size stands in for a full disk.
    # Soft limit only, restored at once: it applies to every file this process writes.
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        with pytest.raises(CacheWriteError, match=rf"no space to build feature cache {root}/clip_tiny-\w+: .*"
                           r"nothing was published") as err:
            ensure_cache(enc, images, root, dtype="float32", **FAST)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert err.value.errno == errno.EFBIG
    assert _only_published(root) == []
    assert len(ensure_cache(enc, images, root, dtype="float32", **FAST)) == len(images)  # fine once there is room


def test_full_tmpfs_fails_cleanly_and_publishes_nothing(enc, images, tmp_path):
    root = tmp_path / "small"
    if not _mount_tmpfs(root, "size=16k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(CacheWriteError, match=r"no space to build feature cache .* MiB free") as err:
            ensure_cache(enc, images, root, dtype="float32", **FAST)
        assert err.value.errno == errno.ENOSPC
        assert _only_published(root) == []
    finally:
        subprocess.run(["umount", str(root)], check=True)


def test_disk_full_mid_build_discards_the_partial_build(enc, images, tmp_path, monkeypatch):
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, pos):  # the second batch finds the disk full (e.g. on a filesystem without fallocate)
        calls.append(pos)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(CacheWriteError, match="no space to build feature cache"):
        ensure_cache(enc, images, tmp_path / "cache", **FAST)
    assert _only_published(tmp_path / "cache") == []


def test_truncated_array_is_refused_then_rebuilt(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    data = cache.path / "features.npy"
    size = data.stat().st_size
    os.truncate(data, size - 100)
    with pytest.raises(CacheCorruptError, match=rf"{cache.path}: features.npy is truncated: {size - 100} bytes, "
                       rf"expected {size}"):
        FeatureCache(cache.path)
    with pytest.raises(CacheCorruptError, match="truncated.*pass rebuild=True"):
        ensure_cache(enc, images, tmp_path / "cache", rebuild=False, **FAST)
    rebuilt = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    assert rebuilt.path == cache.path and data.stat().st_size == size
    assert _only_published(tmp_path / "cache") == [cache.path.name]


def test_index_listing_an_image_the_array_lacks_is_refused(enc, images, tmp_path):
    cache = ensure_cache(enc, images, tmp_path / "cache", **FAST)
    index = json.loads((cache.path / "index.json").read_text())
    index["set/extra"] = len(index)
    (cache.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheCorruptError, match=r"index.json lists image 'set/extra' at row 7, but features.npy "
                       r"holds only 7 rows"):
        FeatureCache(cache.path)
    # A key the compact (fixed-width bytes) index could not tell from another is refused too.
    del index["set/extra"]
    index["set/000\0"] = index.pop("set/000")
    (cache.path / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheCorruptError, match=r"index.json lists image 'set/000\\x00', a key holding a NUL"):
        FeatureCache(cache.path)


def test_fp16_overflow_is_refused(images, tmp_path, monkeypatch):
    enc = tiny_encoder("clip_tiny")
    features = enc._features
    monkeypatch.setattr(enc, "_features", lambda px: features(px) * 1e6)
    with pytest.raises(OverflowError, match="exceed the float16 range.*dtype=float32"):
        ensure_cache(enc, images, tmp_path / "cache", **FAST)


def test_killed_build_leaves_nothing_complete_and_resumes(enc, images, tmp_path):
    root = tmp_path / "cache"
    listing = write_images_json(images, tmp_path / "images.json")
    proc = run_worker(root, listing, "--kill-after", "4")  # SIGKILL after two batches of 2
    assert proc.returncode == -9, proc.stderr.read()
    final = cache_path(root, cache_fingerprint(enc, "float32"))
    assert not final.exists() and _only_published(root) == [f".{final.name}.partial"]
    with pytest.raises(CacheNotFoundError):
        FeatureCache(final)
    rows = []
    cache = ensure_cache(enc, images, root, dtype="float32", on_batch=rows.append, **FAST)
    assert rows == [6, 7]  # resumed after the 4 rows the killed build had recorded
    keys = sorted(images)
    assert torch.equal(cache.get(keys), online(enc, images, keys))
    assert cache.verify() == len(keys)  # the resumed build recomputed the checksums of the rows already written
    assert _only_published(root) == [final.name]


def test_interrupted_build_of_another_image_set_restarts(enc, images, tmp_path):
    root = tmp_path / "cache"
    run_worker(root, write_images_json(images, tmp_path / "images.json"), "--kill-after", "2")
    fewer = dict(list(images.items())[:5])
    rows = []
    cache = ensure_cache(enc, fewer, root, dtype="float32", on_batch=rows.append, **FAST)
    assert rows == [2, 4, 5] and sorted(cache.keys) == sorted(fewer)


def test_two_processes_building_at_once_end_with_one_valid_cache(enc, images, tmp_path):
    root, record = tmp_path / "cache", tmp_path / "builders.txt"
    listing = write_images_json(images, tmp_path / "images.json")
    procs = [run_worker(root, listing, "--slow", "0.3", "--record", str(record), wait=False) for _ in range(2)]
    t0 = time.monotonic()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    paths = {json.loads(out)["path"] for out, _ in outs}
    assert len(paths) == 1 and time.monotonic() - t0 < 120
    assert len(set(record.read_text().split())) == 1  # one process encoded; the other waited and opened its cache
    cache = FeatureCache(paths.pop(), cache_fingerprint(enc, "float32"))
    keys = sorted(images)
    assert torch.equal(cache.get(keys), online(enc, images, keys))
    assert _only_published(root) == [cache.path.name]


def test_concurrent_publish_of_the_same_cache_keeps_one_valid_copy(enc, images, tmp_path):
    """Without the lock (e.g. a filesystem without working locks) the rename still never mixes two builds."""
    first = build_cache(enc, images, tmp_path / "a", **FAST)
    for _ in range(2):
        partial = PartialCache(tmp_path / "b" / first.path.name, first.meta, first.keys)
        (tmp_path / "b").mkdir(exist_ok=True)
        partial.open(resume=False)
        partial.write(0, first.array())
        partial.finish()
        partial.publish()
    cache = FeatureCache(tmp_path / "b" / first.path.name, first.fingerprint)
    assert torch.equal(cache.get(first.keys), first.get(first.keys))
    assert _only_published(tmp_path / "b") == [first.path.name]


def test_unreadable_image_names_the_file_and_keeps_progress(enc, images, tmp_path):
    last = images[sorted(images)[-1]]
    good = last.read_bytes()
    last.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image {last}"):
        ensure_cache(enc, images, tmp_path / "cache", **FAST)
    last.write_bytes(good)
    rows = []
    ensure_cache(enc, images, tmp_path / "cache", on_batch=rows.append, **FAST)
    assert rows == [7]  # the first three batches were kept
