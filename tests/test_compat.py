"""Checkpoints, caches and run folders written before the package restructure (main at 00991e3) still work.

tests/fixtures/main_00991e3/ holds what that main wrote (its README.md has the command): a shapes run's
``last.ckpt`` and ``config_resolved.yaml``, and the two feature caches it built.
"""

import json
import shutil

import pytest
import torch
from entrypoints import ROOT, run
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from fusion.data.cache import FeatureCache, cache_fingerprint
from fusion.data.cache.fingerprint import folder_name
from fusion.run.commands import build, build_encoders, cache_settings
from fusion.run.record import RecordMismatch, save_record, upgrade_record
from fusion.training.resume import check_compatible

FIXTURE = ROOT / "tests" / "fixtures" / "main_00991e3"
# The command the fixture was written with (its README.md), in today's group names.
ARGS = [
    "+experiment=shapes", "encoder=[clip_tiny,dino_tiny]", "text=tiny", "logger=csv", "data.num_workers=0",
    "data.batch_size=4", "training.attention_stats=false", "fusion.width=32", "fusion.depth=1",
    "fusion.num_heads=2", "+trainer.num_sanity_val_steps=0", "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=2", "task.num_train=16", "task.num_val=8", "task.num_test=8",
]


def _compose(overrides: list[str], config: str = "train"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=overrides)


def test_the_old_checkpoint_fits_todays_model_key_for_key(tmp_path):
    cfg = _compose([*ARGS, f"paths.data_dir={tmp_path}/data", f"paths.cache_dir={tmp_path}/cache",
                    f"paths.output_dir={tmp_path}/out"])
    _, model = build(cfg)
    ckpt = FIXTURE / "run" / "last.ckpt"
    check_compatible(ckpt, model)  # every key and shape
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    # Checkpoints leave the frozen encoders out (their weights come from their own files).
    assert set(saved) == {k for k in model.state_dict() if not k.startswith("encoders.")}
    result = model.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("encoders.") for k in result.missing_keys)


def test_the_old_caches_keep_their_fingerprints(tmp_path):
    cfg = _compose([*ARGS, "cache.enabled=true", f"paths.cache_dir={tmp_path}/cache", f"paths.output_dir={tmp_path}"])
    settings = cache_settings(cfg)
    names = sorted(p.name for p in (FIXTURE / "features").iterdir())
    encoders = build_encoders(cfg)
    assert sorted(
        folder_name(cache_fingerprint(enc, settings.dtype, settings.tokens_per_encoder)) for enc in encoders.values()
    ) == names
    for name in names:  # and every row is what the build recorded
        FeatureCache(FIXTURE / "features" / name).verify()


def test_eval_of_the_old_checkpoint_on_the_old_caches_reproduces_its_metrics(tmp_path):
    features = tmp_path / "features"
    shutil.copytree(FIXTURE / "features", features)
    out = tmp_path / "eval"
    proc = run("eval.py", [*ARGS, f"ckpt_path={FIXTURE / 'run' / 'last.ckpt'}", "split=val", "cache.enabled=true",
                           f"cache.dir={features}", "cache.rebuild=false", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    old = json.loads((FIXTURE / "run" / "metrics.json").read_text())
    new = json.loads((out / "metrics.json").read_text())
    assert new["val/acc"] == pytest.approx(old["val/acc"]) and new["val/loss"] == pytest.approx(old["val/loss"])
    assert sorted(p.name for p in features.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (FIXTURE / "features").iterdir())  # read, not rebuilt


def test_an_old_run_folder_resumes_under_todays_names(tmp_path):
    recorded = (FIXTURE / "run" / "config_resolved.yaml").read_text()
    import yaml  # noqa: PLC0415

    plain = yaml.safe_load(recorded)
    paths = plain["paths"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config_resolved.yaml").write_text(recorded)
    cfg = _compose([*ARGS, "trainer.max_epochs=1", "cache.enabled=true", f"paths.output_dir={paths['output_dir']}",
                    f"paths.data_dir={paths['data_dir']}", f"paths.cache_dir={paths['cache_dir']}"])
    cfg.paths.output_dir = paths["output_dir"]
    save_record(cfg, run_dir)  # no RecordMismatch: the old names read as today's
    assert (run_dir / "config_resolved.yaml").read_text() == recorded  # and the record is kept as written
    assert upgrade_record(plain)["training"]["_target_"] == "fusion.training.module.FusionLitModule"
    cfg.training.lr = 0.5
    # training.optimizer.lr reads training.lr: both differ.
    with pytest.raises(RecordMismatch, match=r"training.lr: 0.001 vs 0.5; training.optimizer.lr: 0.001 vs 0.5\."):
        save_record(cfg, run_dir)
