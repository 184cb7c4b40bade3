"""Parameter groups by ``no_weight_decay()`` and the config-built optimiser and schedule."""

from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from torch import nn

from fusion.encoders.text import TextEncoder, build_tiny_bert
from fusion.fusers import ResamplerFuser
from fusion.model.transformer import FusionModel
from fusion.training.optim import configure, cosine_with_warmup, no_weight_decay_names, param_groups

CONF = Path(__file__).resolve().parents[1] / "conf"


def _fusion(**kwargs):
    torch.manual_seed(0)
    return FusionModel({"a": 16, "b": 8}, {"a": 5, "b": 5}, text_dim=12, width=8, depth=1, num_heads=2, **kwargs)


def _decayed(module):
    return sorted(n for n, p in module.named_parameters() if p.requires_grad and n not in no_weight_decay_names(module))


def test_token_concat_fusion_model_decays_only_matrices_and_never_its_tokens():
    model = _fusion()
    # Hand-checked: every weight matrix of the blocks and projections; not text_type, cls_token, the fuser's
    # type_embed or pos_embed.* (the old substring rule decayed text_type), no bias, no norm.
    assert _decayed(model) == [
        "blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.0.weight", "blocks.0.mlp.3.weight",
        "fuser.proj.a.1.weight", "fuser.proj.b.1.weight", "text_proj.1.weight",
    ]
    skipped = no_weight_decay_names(model)
    assert {"cls_token", "text_type", "fuser.type_embed", "fuser.pos_embed.a", "fuser.pos_embed.b"} <= skipped
    assert {"norm.weight", "norm.bias", "blocks.0.norm1.weight", "fuser.proj.a.0.weight"} <= skipped


def test_resampler_queries_image_embedding_and_biased_score_bias_are_not_decayed():
    model = _fusion(fuser=partial(ResamplerFuser, num_queries=2, depth=1, num_heads=2), num_images=2,
                    attention_score="biased_general")
    skipped = no_weight_decay_names(model)
    assert {"fuser.query_tokens", "fuser.pos_embed.a", "image_embed", "blocks.0.attn.score.bias"} <= skipped
    assert "blocks.0.attn.score.weight" in _decayed(model)  # (H, d, d): a matrix per head


def test_text_encoder_embeddings_are_not_decayed_and_frozen_parameters_are_left_out(tmp_path):
    text = TextEncoder(build_tiny_bert(tmp_path / "bert"))
    skipped = no_weight_decay_names(text)
    embeddings = {f"model.embeddings.{k}_embeddings.weight" for k in ("word", "position", "token_type")}
    assert embeddings <= skipped
    assert "model.encoder.layer.0.attention.self.query.weight" in _decayed(text)
    assert not any(n.startswith("model.pooler") for n in skipped | set(_decayed(text)))  # frozen: in no group
    frozen = TextEncoder(tmp_path / "bert", freeze=True)
    assert param_groups(frozen) == [{"params": []}, {"params": [], "weight_decay": 0.0}]


def test_timm_vit_follows_its_own_no_weight_decay():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0)
    wrapper = nn.ModuleDict({"backbone": vit})
    skipped = no_weight_decay_names(wrapper)
    assert {"backbone.cls_token", "backbone.pos_embed"} <= skipped
    # The patch embedding's projection is a weight like any other (the substring rule left it undecayed).
    assert "backbone.patch_embed.proj.weight" in _decayed(wrapper)


def test_groups_carry_every_trainable_parameter_once():
    model = _fusion()
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert "weight_decay" not in param_groups(model)[0]  # then the optimiser's own applies


def test_configure_builds_the_configs_optimizer_and_schedule():
    model = _fusion()
    cfg = compose_training(["training.lr=2e-3", "training.weight_decay=0.1", "training.warmup_ratio=0.5"])
    out = configure(model, instantiate(cfg.optimizer), instantiate(cfg.scheduler), 10, torch.device("cpu"))
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and out["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.defaults["foreach"] is True  # the multi-tensor kernel on CPU
    assert opt.param_groups[0]["lr"] == 0.0  # warm-up starts at 0
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)  # the peak after 5 of 10 steps
    sgd = configure(model, partial(torch.optim.SGD, lr=0.1), None, 10, torch.device("cpu"))
    assert set(sgd) == {"optimizer"} and isinstance(sgd["optimizer"], torch.optim.SGD)


def test_cosine_with_warmup_ends_at_zero():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = cosine_with_warmup(opt, total_steps=4, warmup_ratio=0.0)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs == sorted(lrs, reverse=True) and opt.param_groups[0]["lr"] == pytest.approx(0.0)


def compose_training(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=["+experiment=shapes", *overrides]).training


def test_an_optimizer_state_saved_under_the_substring_rule_is_regrouped_by_name():
    from fusion.training.optim import _legacy_groups, regroup_legacy_optimizer_state

    model = _fusion()
    named = dict(model.named_parameters())
    old_names = _legacy_groups(model)
    assert "text_type" in old_names[0]  # the old rule decayed it; today it is not
    old = torch.optim.AdamW([{"params": [named[n] for n in names]} for names in old_names], lr=1e-3)
    old.param_groups[1]["weight_decay"] = 0.0
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    old.step()
    checkpoint = {"optimizer_states": [old.state_dict()]}
    regroup_legacy_optimizer_state(checkpoint, model)
    new = configure(model, partial(torch.optim.AdamW, lr=1e-3), None, 10, torch.device("cpu"))["optimizer"]
    new.load_state_dict(checkpoint["optimizer_states"][0])  # the group sizes now fit
    for name in ("text_type", "cls_token", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(new.state[named[name]]["exp_avg"], old.state[named[name]]["exp_avg"])
    assert [g["weight_decay"] for g in new.param_groups] == [old.param_groups[0]["weight_decay"], 0.0]
    today = {"groups_rule": "no_weight_decay", "optimizer_states": [new.state_dict()]}
    regroup_legacy_optimizer_state(today, model)  # a checkpoint of today's groups is left as it is
    assert today["optimizer_states"][0]["param_groups"] == new.state_dict()["param_groups"]
