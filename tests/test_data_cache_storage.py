"""Feature cache storages: pooled caches (the model's own pooling at build time), int8 / float8 rows with
per-row float16 scales, their fingerprints, checksums, copies, command line and a training run on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_helpers import make_images, online, tiny_encoder
from entrypoints import run

from fusion.data.cache import (
    CacheCorruptError,
    FeatureCache,
    FingerprintMismatchError,
    build_cache,
    cache_fingerprint,
    cache_path,
    ensure_cache,
    merge_shards,
)
from fusion.data.cache.__main__ import main as cli
from fusion.data.cache.storage import STORAGES, dequantise, float8_supported, quantise
from fusion.encoders.grid import pool_tokens
from fusion.fusers import ChannelConcatFuser, GatedFuser, ResamplerFuser, TokenConcatFuser
from fusion.model.transformer import FusionModel

FAST = dict(batch_size=3, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def enc():
    return tiny_encoder("clip_tiny")  # 17 tokens: [CLS] + a 4 x 4 grid, width 64


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("img"))


def _by_hand_2x2(full: torch.Tensor) -> torch.Tensor:
    """[CLS] + the 4 x 4 grid averaged over its four 2 x 2 blocks, row-major: what K=4 pooling must give."""
    grid = full[:, 1:].reshape(-1, 2, 2, 2, 2, full.shape[-1])  # (B, block row, row in block, block col, col, D)
    return torch.cat([full[:, :1], grid.mean(dim=(2, 4)).flatten(1, 2)], dim=1)


# ---- pooling ------------------------------------------------------------------------------------


def test_pool_tokens_k_to_k_is_the_identity_and_is_the_fusers_reduction():
    x = torch.randn(2, 1 + 16, 8)
    assert pool_tokens(x, 1, 4) is not None and torch.equal(pool_tokens(x, 1, 4), x)
    fuser = TokenConcatFuser({"a": 8}, {"a": 17}, width=8, tokens_per_encoder=4)
    torch.testing.assert_close(fuser.reduce("a", x), _by_hand_2x2(x), rtol=0, atol=1e-6)
    pooled = fuser.reduce("a", x)
    assert torch.equal(fuser.reduce("a", pooled), pooled)  # already 1 + 4 tokens: left as they are


def test_pooled_float32_cache_holds_the_models_pooling(enc, images, tmp_path):
    full = ensure_cache(enc, images, tmp_path, dtype="float32", **FAST)
    pooled = ensure_cache(enc, images, tmp_path, dtype="float32", tokens_per_encoder=4, **FAST)
    keys = sorted(images)
    assert pooled.shape == (len(keys), 5, 64) and pooled.tokens_per_encoder == 4 and full.tokens_per_encoder is None
    assert pooled.path != full.path
    torch.testing.assert_close(pooled.get(keys), _by_hand_2x2(full.get(keys)), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled.get(keys), _by_hand_2x2(online(enc, images, keys)), rtol=0, atol=1e-6)
    assert pooled.bytes_per_image == 5 * 64 * 4


@pytest.mark.parametrize("fuser", [TokenConcatFuser, ResamplerFuser, ChannelConcatFuser, GatedFuser])
def test_model_outputs_on_full_and_pooled_caches_are_equal(fuser, tmp_path):
    clip, dino = tiny_encoder("clip_tiny"), tiny_encoder("dino_tiny")  # 4 x 4 and 6 x 6 grids
    imgs = make_images(tmp_path / "img", n=4)
    keys = sorted(imgs)
    feats = {}
    for k in (None, 4):
        feats[k] = {e.name: ensure_cache(e, imgs, tmp_path / "c", dtype="float32", tokens_per_encoder=k, **FAST)
                    .get(keys) for e in (clip, dino)}
    assert [f.shape[1] for f in feats[4].values()] == [5, 5]
    torch.manual_seed(0)
    model = FusionModel({"clip_tiny": 64, "dino_tiny": 64}, {"clip_tiny": 17, "dino_tiny": 37}, text_dim=16,
                        width=32, depth=1, num_heads=2, fuser=fuser, tokens_per_encoder=4).eval()
    text, mask = torch.randn(len(keys), 3, 16), torch.ones(len(keys), 3, dtype=torch.bool)
    keep = torch.ones(len(keys), 2, dtype=torch.bool)
    with torch.no_grad():
        a, b = model(feats[None], keep, text, mask), model(feats[4], keep, text, mask)
    torch.testing.assert_close(b.pooled, a.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=1e-5, atol=1e-5)


def test_model_refuses_features_of_another_pooling_naming_both_values():
    kw = dict(text_dim=8, width=16, depth=1, num_heads=2)
    text, mask, keep = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)
    pooled = {"a": torch.randn(2, 1 + 4, 8)}  # a cache pooled to K=4
    unpooled = FusionModel({"a": 8}, {"a": 17}, **kw)
    with pytest.raises(ValueError, match=r"cache.tokens_per_encoder=4.*fusion.tokens_per_encoder=None"):
        unpooled(pooled, keep, text, mask)
    other = FusionModel({"a": 8}, {"a": 17}, tokens_per_encoder=1, **kw)
    with pytest.raises(ValueError, match=r"cache.tokens_per_encoder=4.*fusion.tokens_per_encoder=1"):
        other(pooled, keep, text, mask)
    # A full cache serves any K: the model pools it.
    assert other({"a": torch.randn(2, 17, 8)}, keep, text, mask).pooled.shape == (2, 16)


def test_storage_is_part_of_the_fingerprint_and_full_float16_is_unchanged(enc):
    old = cache_fingerprint(enc)
    assert "pooling" not in old and old == cache_fingerprint(enc, "float16", None)
    assert set(old) == set(enc.fingerprint()) | {"num_tokens", "embed_dim", "dtype", "format"}
    pooled = cache_fingerprint(enc, "float16", 4)
    assert pooled["pooling"]["tokens_per_encoder"] == 4 and pooled["pooling"]["prefix_tokens"] == 1
    assert pooled["num_tokens"] == 17  # the encoder's own count; the rows hold 1 + 4
    folders = {cache_path(Path("r"), cache_fingerprint(enc, d, k))
               for d in ("float16", "int8") for k in (None, 4, 16)}
    assert len(folders) == 6


@pytest.mark.parametrize(("k", "what"), [(5, "not a perfect square"), (25, "exceeds encoder 'clip_tiny'"),
                                         (0, "not a perfect square"), ("16", "perfect square integer")])
def test_bad_tokens_per_encoder_is_refused_naming_the_option(enc, k, what):
    with pytest.raises(ValueError) as e:
        cache_fingerprint(enc, "float16", k)
    assert f"cache.tokens_per_encoder={k!r}" in str(e.value) and what in str(e.value)


def test_bad_dtype_is_refused_naming_the_option(enc):
    with pytest.raises(ValueError, match=r"cache.dtype.*'int4'.*int8"):
        cache_fingerprint(enc, "int4")


def test_missing_pooling_is_refused_naming_both_values_or_built(enc, images, tmp_path):
    ensure_cache(enc, images, tmp_path, **FAST)
    with pytest.raises(FingerprintMismatchError, match=r"pooling.tokens_per_encoder: cached None, configured 16"):
        ensure_cache(enc, images, tmp_path, tokens_per_encoder=16, rebuild=False, **FAST)
    built = ensure_cache(enc, images, tmp_path, tokens_per_encoder=16, **FAST)  # 16 = the whole 4 x 4 grid
    assert built.tokens_per_encoder == 16 and built.shape[1] == 17


# ---- quantised storage --------------------------------------------------------------------------


def test_int8_quantisation_by_hand():
    x = torch.tensor([[[127.0, -64.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, -1.0, 0.25, 1.0]]])
    q, s = quantise(x, STORAGES["int8"])
    # Row 0: max 127 -> scale 1 exactly; row 1: all zero -> scale 0. Row 2: 1/127 = 0.0078740 lies between
    # the float16 values 0.0078125 + 8 and + 9 ulps (ulp 2^-17): nearest is 8 ulps = 0.0078735 (below 1/127,
    # so 1.0 / s would exceed 127), rounded up to 9 ulps = 0.0078812; then 1/s = 126.89 -> 127,
    # 0.5/s = 63.44 -> 63, 0.25/s = 31.72 -> 32.
    assert s[0, 0] == 1.0 and s[0, 1] == 0.0 and s.dtype == np.float16
    assert float(s[0, 2]) == 2**-7 + 9 * 2**-17
    assert q[0, 0].tolist() == [127, -64, 3, 0] and q[0, 1].tolist() == [0, 0, 0, 0]
    assert q[0, 2].tolist() == [63, -127, 32, 127]
    out = dequantise(q, s, STORAGES["int8"], torch.empty(1, 3, 4))
    assert torch.equal(out[0, :2], x[0, :2])


def test_int8_cache_rows_are_within_half_a_scale(enc, images, tmp_path):
    ref = ensure_cache(enc, images, tmp_path, dtype="float32", **FAST)
    q8 = ensure_cache(enc, images, tmp_path, dtype="int8", **FAST)
    keys = sorted(images)
    assert sorted(p.name for p in q8.path.iterdir()) == [
        "COMPLETE", "checksums.npy", "features.npy", "index.json", "meta.json", "scales.npy"
    ]
    stored = np.load(q8.path / "features.npy")
    scales = np.load(q8.path / "scales.npy").astype(np.float32)
    assert stored.dtype == np.int8 and scales.shape == (len(keys), 17) and np.abs(stored).max() <= 127
    x, deq = ref.get(keys), q8.get(keys, dtype=torch.float32)
    assert torch.equal(deq, torch.from_numpy(stored.astype(np.float32) * scales[..., None]))  # q * s exactly
    err = (x - deq).abs()
    bound = torch.from_numpy(scales)[..., None] / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())
    assert int(np.abs(stored).max(axis=-1).min()) == 127  # every row uses the full range
    got16 = q8.get(keys)
    assert got16.dtype == torch.float16 and torch.equal(got16, deq.half())
    assert q8.bytes_per_image == 17 * 64 + 17 * 2 and ref.bytes_per_image == 17 * 64 * 4
    assert q8.storage.name == "int8" and q8.meta["dtype"] == "int8"


@pytest.mark.skipif(not float8_supported(), reason="this torch cannot cast to float8_e4m3fn")
def test_float8_cache_rows_are_within_float8_rounding(enc, images, tmp_path):
    ref = ensure_cache(enc, images, tmp_path, dtype="float32", **FAST)
    f8 = ensure_cache(enc, images, tmp_path, dtype="float8_e4m3fn", tokens_per_encoder=4, **FAST)
    pooled = ensure_cache(enc, images, tmp_path, dtype="float32", tokens_per_encoder=4, **FAST)
    keys = sorted(images)
    x, deq = pooled.get(keys), f8.get(keys, dtype=torch.float32)
    scales = torch.from_numpy(np.load(f8.path / "scales.npy").astype(np.float32))[..., None]
    # e4m3: 3 mantissa bits, half an ulp is 2^-4 of the value; below 2^-6 (subnormals) steps of 2^-9.
    assert bool(((x - deq).abs() <= torch.maximum(x.abs() * 2**-4, scales * 2**-10) * 1.0001).all())
    assert f8.dtype == np.uint8 and ref.shape[1] == 17 and f8.shape[1] == 5


def test_quantised_checksums_cover_the_scales(enc, images, tmp_path):
    q8 = ensure_cache(enc, images, tmp_path, dtype="int8", **FAST)
    assert q8.verify() == len(images)
    scales = np.load(q8.path / "scales.npy", mmap_mode="r+")
    scales[3, 0] = scales[3, 0] * 2  # same size, same header: only the checksum can tell
    scales.flush()
    del scales
    with pytest.raises(CacheCorruptError, match=r"row 3 .*does not match its checksum"):
        FeatureCache(q8.path)
    with pytest.raises(CacheCorruptError, match=r"row 3"):
        FeatureCache(q8.path, check_rows=0).verify()


def test_quantised_pooled_shards_merge_and_extend_as_stored(enc, images, tmp_path):
    kw = dict(dtype="int8", tokens_per_encoder=4, **FAST)
    whole = build_cache(enc, images, tmp_path / "a", **kw)
    for i in range(3):
        build_cache(enc, images, tmp_path / "b", shard=i, num_shards=3, **kw)
    merged = merge_shards(tmp_path / "b", whole.fingerprint, 3)
    rows = np.arange(len(whole))
    assert merged.keys == whole.keys and merged.verify() == len(images)
    for a, b in zip(merged.read_stored(rows), whole.read_stored(rows), strict=True):
        assert np.array_equal(a, b)
    # Extending: the first images' stored rows are copied (never dequantised and re-rounded).
    first = {k: images[k] for k in sorted(images)[:3]}
    small = ensure_cache(enc, first, tmp_path / "c", **kw)
    before = small.read_stored(np.arange(3))
    grown = ensure_cache(enc, images, tmp_path / "c", **kw)
    assert len(grown) == len(images) and grown.keys[:3] == sorted(first)
    for a, b in zip(grown.read_stored(np.arange(3)), before, strict=True):
        assert np.array_equal(a, b)
    assert torch.equal(grown.get(sorted(images)), whole.get(sorted(images)))


# ---- command line and a training run ------------------------------------------------------------


def test_cli_build_with_storage_options_and_info(images, tmp_path, capsys):
    folder = next(iter(images.values())).parent
    cli(["build", "--encoder", "clip_tiny", "--image-dir", str(folder), "--key-prefix", "set/",
         "--root", str(tmp_path / "cache"), "--workers", "0", "--dtype", "int8", "--tokens-per-encoder", "4"])
    out = capsys.readouterr().out.split()
    assert out[1:] == ["(7,", "5,", "64)", "int8", "tokens_per_encoder=4", "330", "B/image"]
    cli(["info", out[0]])
    info = json.loads(capsys.readouterr().out)
    storage = info["storage"]
    assert storage["dtype"] == "int8" and storage["tokens_per_encoder"] == 4 and storage["tokens"] == 5
    assert storage["bytes_per_image"] == 5 * 64 + 5 * 2 and storage["images"] == 7
    assert storage["total_bytes"] == sum(p.stat().st_size for p in Path(out[0]).iterdir())
    assert info["shape"] == [7, 5, 64]


def test_shapes_trains_through_an_int8_pooled_cache(tmp_path):
    args = ["+experiment=shapes", "task.num_train=24", "task.num_val=8", "task.num_test=8", "data.num_workers=0",
            "data.batch_size=16", "encoder=[clip_tiny,dino_tiny]", "cache.num_workers=0", "logger=csv",
            "trainer.max_epochs=1", "training.attention_stats=false", "fusion.width=32", "fusion.depth=1",
            "cache.enabled=true", "cache.dtype=int8", "cache.tokens_per_encoder=4", "fusion.tokens_per_encoder=4",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run("train.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"val/acc", "test/acc"} <= set(json.loads((tmp_path / "run" / "metrics.json").read_text()))
    caches = [FeatureCache(p) for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir()]
    assert sorted((c.fingerprint["name"], c.storage.name, c.shape[1]) for c in caches) == [
        ("clip_tiny", "int8", 5), ("dino_tiny", "int8", 5)
    ]
