"""The statistics callbacks: fed by step outputs, they log the scalars and write the files at the epoch's end."""

import json
from types import SimpleNamespace

import torch

from fusion.fusers import ChannelConcatFuser, TokenConcatFuser
from fusion.model.transformer import FusionModel
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
