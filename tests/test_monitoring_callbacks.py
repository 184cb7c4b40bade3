"""The statistics callbacks: fed by step outputs, they log the scalars and write the files at the epoch's end;
the multimodal transformer's outputs ({"fusion": ...}) and the LM head's ({"lm": ..., "fused": ...})."""

import json
from types import SimpleNamespace

import pytest
import torch
from lm_helpers import build_tiny_lm, fused_tokens

from fusion.fusers import ChannelConcatFuser, FusedTokens, TokenConcatFuser
from fusion.fusers.groups import ANSWER_GROUP, CLS_GROUP, PAD_GROUP, TEXT_GROUP
from fusion.model.lm import LMHead, LMHeadOutput, LMInputs
from fusion.model.transformer import FusionModel
from fusion.monitoring.attention_stats import LM_QUERY_KINDS, load_stats
from fusion.monitoring.callbacks import AttentionStatsCallback, FuserWeightsCallback


class _Module(torch.nn.Module):
    """What the callbacks read from a LightningModule."""

    def __init__(self, fusion, attention_stats=True):
        super().__init__()
        self.fusion, self.encoder_names, self.attention_stats = fusion, ["a", "b"], attention_stats
        self.hparams = SimpleNamespace(drop_encoders=["b"])
        self.output_dir, self.loggers, self.logged = None, [], {}
        self.device = torch.device("cpu")

    def log_dict(self, values):
        self.logged.update(values)


def _fusion(fuser=TokenConcatFuser):
    torch.manual_seed(0)
    return FusionModel({"a": 8, "b": 8}, {"a": 5, "b": 5}, text_dim=8, width=8, depth=2, num_heads=2, fuser=fuser)


def _epoch(callback, module, stage, trainer):
    start, batch_end, end = (getattr(callback, f"on_{'validation' if stage == 'val' else 'test'}_{h}")
                             for h in ("epoch_start", "batch_end", "epoch_end"))
    start(trainer, module)
    keep = torch.tensor([[True, True], [True, False]])
    out = module.fusion({"a": torch.randn(2, 5, 8), "b": torch.randn(2, 5, 8)}, keep, torch.randn(2, 3, 8),
                        torch.ones(2, 3, dtype=torch.bool), output_attentions=module.attention_stats)
    batch_end(trainer, module, {"fusion": out}, None, 0)
    batch_end(trainer, module, None, None, 1)  # a step without output counts nothing
    end(trainer, module)


def test_attention_statistics_are_logged_and_written_per_split(tmp_path):
    module = _Module(_fusion())
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=3)
    callback = AttentionStatsCallback(output_dir=tmp_path)
    _epoch(callback, module, "val", trainer)
    _epoch(callback, module, "test", trainer)
    assert "attn/cls/layer1/a" in module.logged and "test/attn/text/layer0/cls" in module.logged
    saved = json.loads((tmp_path / "attention" / "test" / "attention.json").read_text())
    assert saved["groups"] == ["a", "b", "text", "cls"] and saved["epoch"] == 3 and saved["drop_encoders"] == ["b"]
    assert (tmp_path / "attention" / "val" / "attention_cls_heads.png").is_file()


def test_nothing_is_logged_while_sanity_checking_or_without_statistics(tmp_path):
    trainer = SimpleNamespace(sanity_checking=True, is_global_zero=True, current_epoch=0)
    module = _Module(_fusion(), attention_stats=True)
    _epoch(AttentionStatsCallback(output_dir=tmp_path), module, "val", trainer)
    trainer.sanity_checking = False
    off = _Module(_fusion(), attention_stats=False)
    _epoch(AttentionStatsCallback(output_dir=tmp_path), off, "val", trainer)
    _epoch(FuserWeightsCallback(output_dir=tmp_path), off, "val", trainer)  # token_concat reports no weights
    assert module.logged == {} and off.logged == {} and not (tmp_path / "attention").exists()


def test_fuser_weights_of_a_mixing_fuser_go_to_the_modules_output_dir(tmp_path):
    module = _Module(_fusion(ChannelConcatFuser), attention_stats=False)
    module.output_dir = tmp_path
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0)
    _epoch(FuserWeightsCallback(), module, "val", trainer)
    assert set(module.logged) == {"fuser/a", "fuser/b"}
    saved = json.loads((tmp_path / "attention" / "val" / "fuser_weights.json").read_text())
    assert saved["encoders"] == ["a", "b"] and saved["split"] == "val"
    assert (tmp_path / "attention" / "val" / "fuser_weights.png").is_file()


def test_wandb_gets_the_table_and_one_image_per_figure(tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    calls = []
    wandb = WandbLogger.__new__(WandbLogger)  # no wandb run: only the two calls the callback makes
    wandb.log_table = lambda key, columns, data: calls.append((key, columns, len(data)))
    wandb.log_image = lambda key, images: calls.append((key, images))
    module = _Module(_fusion())
    module.loggers = [object(), wandb]  # other loggers get nothing
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0)
    _epoch(AttentionStatsCallback(output_dir=tmp_path), module, "test", trainer)
    assert calls[0] == ("test/attn/table", ["query", "layer", "head", "group", "mass"], 2 * 2 * 2 * 4)
    assert sorted(c[0] for c in calls[1:]) == [f"test/attn/attention_{q}_{k}" for q in ("cls", "text")
                                               for k in ("heads", "layers")]


# ---- the LM head's step outputs -----------------------------------------------------------------------------


class _LMModule(torch.nn.Module):
    """What the callbacks read from the LM module: no ``fusion``; the LM's shape and the fuser's flags."""

    def __init__(self, lm_attention_shape, mixes_encoders=False, reports_encoder_weights=True, attention_stats=True):
        super().__init__()
        self.encoder_names, self.attention_stats = ["a", "b"], attention_stats
        self.lm_attention_shape = lm_attention_shape
        self.mixes_encoders, self.reports_encoder_weights = mixes_encoders, reports_encoder_weights
        self.hparams = SimpleNamespace(drop_encoders=[])
        self.output_dir, self.loggers, self.logged = None, [], {}
        self.device = torch.device("cpu")

    def log_dict(self, values):
        self.logged.update(values)


def _lm_output(attentions, groups) -> LMHeadOutput:
    """An LMHeadOutput around hand-made attentions and groups (the fields the statistics do not read are 0)."""
    B, S = groups.shape
    mask = (groups != PAD_GROUP).long()
    inputs = LMInputs(torch.zeros(B, S, 4), mask, (mask.cumsum(1) - 1).clamp(min=0), groups)
    return LMHeadOutput(logits=torch.zeros(B, S, 3), inputs=inputs, attentions=attentions)


def _lm_hand_step() -> dict:
    """B=2, S=5, one layer and head. Sample 0: [BOS, a, b, prompt, answer]; sample 1: [pad, BOS, a, prompt,
    answer] (b dropped). Queries other than the prompt and first answer attend to themselves."""
    groups = torch.tensor(
        [[CLS_GROUP, 0, 1, TEXT_GROUP, ANSWER_GROUP], [PAD_GROUP, CLS_GROUP, 0, TEXT_GROUP, ANSWER_GROUP]]
    )
    probs = torch.eye(5).expand(2, 1, 5, 5).clone()
    probs[0, 0, 3] = torch.tensor([0.2, 0.3, 0.5, 0.0, 0.0])  # a .3, b .5, bos .2
    probs[0, 0, 4] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])  # a .2, b .3, prompt .4, bos .1
    probs[1, 0, 3] = torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0])  # a .5, bos .5
    probs[1, 0, 4] = torch.tensor([0.0, 0.0, 0.5, 0.25, 0.25])  # a .5, prompt .25, answer .25
    fused = FusedTokens(torch.zeros(2, 3, 4), torch.tensor([0, 0, 1]), torch.tensor([[True] * 3, [True, True, False]]),
                        encoder_weights=torch.tensor([[0.75, 0.25], [1.0, 0.0]]))
    return {"lm": _lm_output((probs,), groups), "fused": fused}


def _lm_epoch(callbacks, module, stage, trainer, steps):
    hooks = "validation" if stage == "val" else "test"
    for callback in callbacks:
        getattr(callback, f"on_{hooks}_epoch_start")(trainer, module)
        for i, step in enumerate(steps):
            getattr(callback, f"on_{hooks}_batch_end")(trainer, module, step, None, i)
        getattr(callback, f"on_{hooks}_epoch_end")(trainer, module)


def test_lm_step_outputs_give_prompt_and_answer_statistics_and_fuser_weights(tmp_path):
    from pytorch_lightning.loggers import WandbLogger

    calls = []
    wandb = WandbLogger.__new__(WandbLogger)
    wandb.log_table = lambda key, columns, data: calls.append((key, columns, len(data)))
    wandb.log_image = lambda key, images: calls.append((key, images))
    module = _LMModule((1, 1))
    module.loggers = [wandb]
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=2)
    step = _lm_hand_step()
    no_attention = {"lm": _lm_output(None, step["lm"].inputs.groups), "fused": step["fused"]}
    steps = [step, no_attention, {"fused": step["fused"]}, None]  # only the first has attentions
    _lm_epoch([AttentionStatsCallback(output_dir=tmp_path), FuserWeightsCallback(output_dir=tmp_path)], module,
              "test", trainer, steps)

    groups = ["a", "b", "prompt", "answer", "bos"]
    expected = {"prompt": [0.4, 0.25, 0.0, 0.0, 0.35], "answer": [0.35, 0.15, 0.325, 0.125, 0.05]}
    attn = {k: v for k, v in module.logged.items() if k.startswith("test/attn/")}
    assert set(attn) == {f"test/attn/{q}/layer0/{g}" for q in expected for g in groups}
    for query, masses in expected.items():
        for group, mass in zip(groups, masses, strict=True):
            assert attn[f"test/attn/{query}/layer0/{group}"] == pytest.approx(mass)
    # The fuser's weights of all three steps that carry them: (.75 + 1) / 2 and (.25 + 0) / 2 each.
    assert module.logged["test/fuser/a"] == pytest.approx(0.875)
    assert module.logged["test/fuser/b"] == pytest.approx(0.125)

    folder = tmp_path / "attention" / "test"
    saved = json.loads((folder / "attention.json").read_text())
    assert saved["groups"] == groups and saved["queries"] == ["prompt", "answer"] and saved["epoch"] == 2
    stats, _ = load_stats(folder, query_kinds=LM_QUERY_KINDS)
    torch.testing.assert_close(stats[:, 0, 0], torch.tensor([expected["prompt"], expected["answer"]]))
    assert (folder / "attention_answer_heads.png").is_file() and (folder / "fuser_weights.json").is_file()
    assert calls[0] == ("test/attn/table", ["query", "layer", "head", "group", "mass"], 2 * 1 * 1 * 5)
    images = sorted(c[0] for c in calls if c[0].startswith("test/attn/attention_"))
    assert images == [f"test/attn/attention_{q}_{k}" for q in ("answer", "prompt") for k in ("heads", "layers")]
    assert ("test/fuser/table", ["encoder", "weight"], 2) in calls


def test_lm_module_flags_decide_what_is_collected(tmp_path):
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0)
    module = _LMModule((1, 1), reports_encoder_weights=False, attention_stats=False)
    _lm_epoch([AttentionStatsCallback(output_dir=tmp_path), FuserWeightsCallback(output_dir=tmp_path)], module,
              "val", trainer, [_lm_hand_step()])
    assert module.logged == {} and not (tmp_path / "attention").exists()
    # A mixing fuser's module: the LM statistic has the "fused" group.
    mixed = _LMModule((1, 1), mixes_encoders=True, reports_encoder_weights=False)
    _lm_epoch([AttentionStatsCallback()], mixed, "val", trainer, [_lm_hand_step()])
    assert mixed.logged["attn/prompt/layer0/fused"] == 0.0
    assert mixed.logged["attn/prompt/layer0/a"] == pytest.approx(0.4)


def test_a_real_lm_heads_attentions_with_padding_and_a_mixing_fuser(tmp_path):
    torch.manual_seed(0)
    head = LMHead(build_tiny_lm(tmp_path / "llama", "llama"), width=16).eval()
    fused = fused_tokens(2, per_encoder=(3, 2), mixed=1)
    fused.visible[0, 3:5] = False  # sample 0 drops encoder b: it is left-padded
    with torch.no_grad():
        out = head(fused, ["Question: is there a square? Answer:", "what color?"], ["yes", "top left"],
                   output_attentions=True)
    assert (out.inputs.groups[:, 0] == PAD_GROUP).any()
    config = head.base_lm.config
    module = _LMModule((config.num_hidden_layers, config.num_attention_heads), mixes_encoders=True,
                       reports_encoder_weights=False)
    module.output_dir = tmp_path / "run"
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0)
    _lm_epoch([AttentionStatsCallback()], module, "val", trainer, [{"lm": out, "fused": fused}])

    stats, groups = load_stats(tmp_path / "run" / "attention" / "val", query_kinds=LM_QUERY_KINDS)
    assert groups == ["a", "b", "fused", "prompt", "answer", "bos"] and stats.shape == (2, 2, 4, 6)
    torch.testing.assert_close(stats.sum(-1), torch.ones(2, 2, 4))  # padding holds no mass
    assert (stats[0, ..., 4] == 0).all()  # causal: prompt queries never see the answer
    assert (stats[1, ..., 4] > 0).all() and (stats[..., [0, 1, 2, 3, 5]] > 0).all()
