"""Frozen vision encoders: tiny timm towers of each family, local weights files, transformers models."""

import json
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from fusion.encoders.vision import HFVisionEncoder, TimmEncoder

CONF = Path(__file__).resolve().parents[1] / "conf" / "encoder"
TINY = ["clip_tiny", "dino_tiny", "vit_tiny"]
CLIP_MEAN = (0.4815, 0.4578, 0.4082)
IMAGENET_MEAN = (0.485, 0.456, 0.406)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """No network and an empty hub cache, whatever the machine has cached."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _cfg(name: str, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")[name])
    return {**cfg, **overrides}


def _build(name: str, **overrides) -> TimmEncoder:
    cfg = _cfg(name, **overrides)
    assert cfg.pop("_target_") == "fusion.encoders.vision.TimmEncoder"
    return TimmEncoder(**cfg)


def _pixels(enc, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *enc.preprocess.input_size, generator=g)


@pytest.mark.parametrize("name", TINY)
def test_tiny_config_builds_frozen_token_encoder(name):
    cfg = _cfg(name)
    enc = instantiate(OmegaConf.load(CONF / f"{name}.yaml")[name])  # as run.py does, from a DictConfig
    size, patch = cfg["model_kwargs"]["img_size"], cfg["model_kwargs"]["patch_size"]
    assert enc.name == name and enc.preprocess.input_size == (size, size)
    assert enc.embed_dim == 64 and enc.num_tokens == 1 + (size // patch) ** 2
    out = enc(_pixels(enc))
    assert out.shape == (2, enc.num_tokens, 64) and not out.requires_grad
    assert not any(p.requires_grad for p in enc.parameters())
    # no_grad (not inference_mode): the features can feed a trainable layer and be backpropagated through.
    head = nn.Linear(64, 1)
    head(out).sum().backward()
    assert head.weight.grad is not None


@pytest.mark.parametrize(
    ("name", "suffix"), [("clip_tiny", ".pth"), ("dino_tiny", ".safetensors"), ("vit_tiny", ".bin")]
)
def test_local_weights_file_loads_through_timm_pretrained_path(tmp_path, name, suffix):
    source = _build(name, init_seed=123)
    path = tmp_path / f"{name}{suffix}"
    state = source.model.state_dict()
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    # init_seed differs from the file's weights: only the file decides them.
    loaded = _build(name, pretrained=True, weights=str(path), init_seed=0)
    x = _pixels(source)
    assert torch.equal(loaded(x), source(x))
    assert loaded.fingerprint()["sha256"] == source.fingerprint()["sha256"]
    assert loaded.fingerprint()["sha256"] != _build(name, init_seed=0).fingerprint()["sha256"]


@pytest.mark.parametrize("name", TINY)
def test_weights_file_of_other_key_names_is_refused_not_silently_ignored(tmp_path, name):
    # timm loads non-strictly when it drops a classifier (clip and vit configs): without the check, these
    # towers would keep their random init.
    state = {f"renamed.{k}": v for k, v in _build(name, init_seed=5).model.state_dict().items()}
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=rf"encoder '{name}': weights file .*renamed.pth' lacks (\d+ of the|tensors)"):
        _build(name, pretrained=True, weights=str(path))


def test_eval_mode_survives_train_with_dropout_configured():
    kwargs = {**_cfg("clip_tiny")["model_kwargs"], "drop_rate": 0.5, "drop_path_rate": 0.5, "attn_drop_rate": 0.5}
    enc = _build("clip_tiny", model_kwargs=kwargs)
    parent = nn.ModuleDict({"enc": enc, "head": nn.Linear(64, 2)})
    parent.train()
    assert parent.training and parent["head"].training
    assert not any(m.training for m in enc.modules())
    x = _pixels(enc)
    assert torch.equal(enc(x), enc(x))


def test_random_init_is_deterministic_and_leaves_caller_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = _build("dino_tiny")
    assert torch.equal(torch.rand(3), expected)
    b = _build("dino_tiny")
    x = _pixels(a)
    assert torch.equal(a(x), b(x))
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint()["sha256"] != _build("dino_tiny", init_seed=9).fingerprint()["sha256"]


def test_each_family_brings_its_own_preprocessing():
    clip, dino, vit = (_build(n).preprocess for n in TINY)
    assert clip.mean == pytest.approx(CLIP_MEAN, abs=1e-4)
    assert dino.mean == pytest.approx(IMAGENET_MEAN, abs=1e-4)
    assert vit.mean == vit.std == (0.5, 0.5, 0.5)
    assert clip.input_size == (32, 32) and dino.input_size == (48, 48)
    gray = Image.fromarray(np.full((50, 70, 3), 128, dtype=np.uint8))
    for pre in (clip, dino, vit):
        pixels = pre.transform()(gray)
        assert pixels.shape == (3, *pre.input_size)
        expected = [(128 / 255 - m) / s for m, s in zip(pre.mean, pre.std, strict=True)]
        assert pixels.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-3)
    assert json.loads(json.dumps(clip.as_dict())) == clip.as_dict()


def test_second_to_last_layer_is_the_raw_block_output_prefix_first():
    last = _build("vit_tiny")
    penult = _build("vit_tiny", layer=-2)
    x = _pixels(last)
    out = penult(x)
    assert out.shape == (2, last.num_tokens, last.embed_dim)
    assert not torch.allclose(out, last(x))
    # Recompute block 0 (of 2) by hand: patch embedding, [CLS] + positions, first block; no final norm.
    m = penult.model
    with torch.no_grad():
        manual = m.blocks[0](m.norm_pre(m._pos_embed(m.patch_embed(x))))
    torch.testing.assert_close(out, manual)
    assert torch.equal(_build("vit_tiny", layer=0)(x), out)
    assert torch.equal(_build("vit_tiny", layer=1)(x), last(x))  # the last index is the last layer


def test_fingerprint_tracks_weights_and_layer():
    enc = _build("clip_tiny")
    base = enc.fingerprint()
    assert set(base) >= {"name", "source", "model", "sha256", "layer", "preprocess"}
    assert _build("clip_tiny", layer=-2).fingerprint()["layer"] != base["layer"]
    assert _build("clip_tiny", layer=1).fingerprint() == base  # same block, same features
    with torch.no_grad():
        next(enc.model.parameters()).add_(1e-3)
    assert enc.fingerprint()["sha256"] != base["sha256"]


@pytest.mark.parametrize("layer", [2, -3])
def test_out_of_range_layer_is_named(layer):
    with pytest.raises(ValueError, match=rf"layer={layer}.*-2\.\.1"):
        _build("clip_tiny", layer=layer)


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=rf"dino_tiny.*{missing.name}"):
        _build("dino_tiny", pretrained=True, weights=str(missing))


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"vit_base_patch16_clip_224\.opnai.*vit_base_patch16_clip_224\.openai"):
        TimmEncoder("x", "vit_base_patch16_clip_224.opnai")
    with pytest.raises(ValueError, match="vit_bsae_patch16_224"):
        TimmEncoder("x", "vit_bsae_patch16_224")


def test_pretrained_offline_without_weights_says_how_to_pass_a_file(hub_offline):
    with pytest.raises(RuntimeError, match=r"vit_base_patch16_224\.dino.*encoder\.dino_tiny\.weights="):
        _build("dino_tiny", pretrained=True)


@pytest.mark.parametrize("name", ["clip", "dino", "vit"])
def test_real_configs_name_pretrained_timm_towers(name):
    import timm

    cfg = _cfg(name)
    assert cfg["pretrained"] is True and cfg["weights"] is None
    assert timm.list_pretrained(cfg["model_name"]) == [cfg["model_name"]]


# --- transformers backend -------------------------------------------------------------------------


# A 32 px, 2-block, 32-wide tower: (32 / 8) ** 2 + 1 = 17 tokens.
TINY_HF = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)


def _tiny_vit_folder(path: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(**TINY_HF)).save_pretrained(path)
    ViTImageProcessor(
        size={"height": 32, "width": 32},
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.4, 0.5, 0.6],
        resample=Image.Resampling.BILINEAR,
    ).save_pretrained(path)
    return path


def _tiny_clip_folder(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision_config=TINY_HF,
        text_config=dict(TINY_HF, num_hidden_layers=1, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_hf_vit_folder(tmp_path):
    from transformers import ViTModel

    folder = _tiny_vit_folder(tmp_path / "vit")
    enc = HFVisionEncoder("hf_vit", str(folder))
    pre = enc.preprocess
    assert pre.input_size == (32, 32) and pre.crop_mode == "squash" and pre.interpolation == "bilinear"
    assert pre.mean == pytest.approx((0.1, 0.2, 0.3)) and pre.std == pytest.approx((0.4, 0.5, 0.6))
    assert enc.num_tokens == 17 and enc.embed_dim == 32
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 32, 32)
    reference = ViTModel.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = reference(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(enc(x), ref.last_hidden_state)
    torch.testing.assert_close(HFVisionEncoder("hf_vit", str(folder), layer=-2)(x), ref.hidden_states[1])
    assert enc.fingerprint()["source"] == "transformers"


def test_hf_clip_checkpoint_loads_its_vision_tower(tmp_path):
    from transformers import CLIPModel, CLIPVisionModel

    folder = _tiny_clip_folder(tmp_path / "clip")
    enc = HFVisionEncoder("hf_clip", str(folder))
    assert isinstance(enc.model, CLIPVisionModel)
    pre = enc.preprocess
    assert pre.input_size == (32, 32) and pre.crop_mode == "center" and pre.crop_pct == pytest.approx(32 / 40)
    assert pre.mean == pytest.approx(CLIP_MEAN, abs=1e-4) and pre.interpolation == "bicubic"
    assert pre.transform()(Image.new("RGB", (60, 45))).shape == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(folder).eval().vision_model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(enc(x), ref)
    enc.train()
    assert not enc.model.training


def test_hf_dinov2_folder(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_HF)).save_pretrained(tmp_path)
    processor = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    enc = HFVisionEncoder("hf_dino", tmp_path, layer=-2)
    assert enc.preprocess.crop_pct == pytest.approx(32 / 36) and enc.num_tokens == 17
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_hf_missing_folder_and_offline_name_are_named(tmp_path, hub_offline):
    missing = tmp_path / "no" / "such_model"
    with pytest.raises(FileNotFoundError, match="such_model"):
        HFVisionEncoder("hf", str(missing))
    with pytest.raises(OSError, match=r"'some-org/not-a-vision-model'.*encoder\.hf\.name_or_path"):
        HFVisionEncoder("hf", "some-org/not-a-vision-model")
