"""Config composition and the train.py / eval.py entry points, run as a user runs them."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from fusion.model.attention import ATTENTION_SCORES
from fusion.run.commands import build, build_encoders

ROOT = Path(__file__).resolve().parents[1]
TINY = ["clip_tiny", "dino_tiny", "vit_tiny"]
SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations(TINY, r)]


def _compose(tmp_path, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.data_dir = str(tmp_path / "data")
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_encoder_subset_composes_and_builds(tmp_path, subset):
    cfg = _compose(tmp_path, ["+experiment=shapes", f"encoder=[{','.join(subset)}]"])
    assert list(cfg.encoder) == subset
    encoders = build_encoders(cfg)
    assert list(encoders) == subset


def test_subset_sweep_config_lists_all_seven(tmp_path):
    cfg = _compose(tmp_path, ["+experiment=shapes_subsets"])
    sweep = cfg.hydra.sweeper.params.encoder
    choices = [c.strip("[]").split(",") for c in sweep.split("],[")]
    assert sorted(map(sorted, choices)) == sorted(map(sorted, SUBSETS))
    assert cfg.hydra.mode.name == "MULTIRUN"


def test_model_builds_from_config(tmp_path):
    cfg = _compose(tmp_path, ["+experiment=shapes", "task.num_train=4", "task.num_val=2", "task.num_test=2"])
    dm, model = build(cfg)
    assert list(model.encoders) == TINY
    assert model.fusion.width == cfg.fusion.width


FUSIONS = {
    "token_concat": "TokenConcatFuser",
    "channel_concat": "ChannelConcatFuser",
    "resampler": "ResamplerFuser",
    "gated": "GatedFuser",
}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_composes_with_the_experiment_and_builds(tmp_path, fusion):
    cfg = _compose(
        tmp_path,
        ["+experiment=shapes", f"fusion={fusion}", "fusion.tokens_per_encoder=4", "task.num_train=4",
         "task.num_val=2", "task.num_test=2"],
    )
    # The experiment's fusion overrides apply on top of whichever fusion is chosen.
    assert (cfg.fusion.width, cfg.fusion.depth, cfg.fusion.dropout) == (128, 2, 0.0)
    assert cfg.fusion.fuser._target_ == f"fusion.fusers.{FUSIONS[fusion]}"
    _, model = build(cfg)
    fuser = model.fusion.fuser
    assert type(fuser).__name__ == FUSIONS[fusion] and fuser.tokens_per_encoder == 4
    assert fuser.encoder_prefix == dict.fromkeys(TINY, 1)
    expected = {"token_concat": 3 * (1 + 4), "channel_concat": 1 + 4, "gated": 1 + 4, "resampler": 32}
    assert fuser.num_tokens == expected[fusion]


def test_unknown_and_empty_encoder_choices_are_named(tmp_path):
    with pytest.raises(Exception, match=r"encoder/nope"):
        _compose(tmp_path, ["encoder=[nope]"])
    cfg = _compose(tmp_path, ["encoder=[]"])
    with pytest.raises(ValueError, match="no vision encoder chosen"):
        build_encoders(cfg)
    with pytest.raises(Exception, match=r"(?s)task/nope.*shapes"):
        _compose(tmp_path, ["task=nope"])


def test_image_crop_makes_every_encoder_see_the_whole_wide_picture(tmp_path):
    # An NLVR-like 500x100 picture: red, green and blue boxes side by side.
    picture = Image.new("RGB", (500, 100), "white")
    for i, colour in enumerate(("red", "lime", "blue")):
        picture.paste(colour, (20 + 170 * i, 20, 120 + 170 * i, 80))

    def colours_seen(cfg) -> dict[str, set[str]]:
        seen = {}
        for name, enc in build_encoders(cfg).items():
            pre = enc.preprocess
            pixels = enc.preprocess.transform()(picture)  # (3, H, W), normalized
            rgb = pixels * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)
            red, green, blue = ((rgb[c] > 0.6) & (rgb.sum(0) < 1.4) for c in range(3))
            seen[name] = {n for n, mask in zip(("red", "green", "blue"), (red, green, blue), strict=True) if mask.any()}
        return seen

    own = colours_seen(_compose(tmp_path, ["+experiment=shapes"]))
    assert all(seen == {"green"} for seen in own.values()), own  # the centre crop: the middle box only
    squashed = _compose(tmp_path, ["+experiment=shapes", "image_crop=squash"])
    assert all(seen == {"red", "green", "blue"} for seen in colours_seen(squashed).values())
    # Part of the fingerprint, so caches and checkpoints of the two preprocessings never mix.
    fingerprints = [next(iter(build_encoders(c).values())).fingerprint() for c in (_compose(tmp_path, []), squashed)]
    assert fingerprints[0]["preprocess"]["crop_mode"] != fingerprints[1]["preprocess"]["crop_mode"]
    with pytest.raises(ValueError, match=r"image_crop='stretch': expected one of center, squash, border"):
        build_encoders(_compose(tmp_path, ["image_crop=stretch"]))
    assert _compose(tmp_path, ["+experiment=nlvr"]).image_crop == "squash"


@pytest.mark.parametrize(
    ("override", "says"),
    [("training.lr=fast", r"training.lr='fast': expected a number > 0"),
     ("training.ve_dropout=abc", r"training.ve_dropout='abc': expected a number in \[0, 1\)")],
)
def test_a_bad_numeric_option_is_named_with_its_key(tmp_path, override, says):
    cfg = _compose(tmp_path, ["+experiment=shapes", override, "task.num_train=4"])
    # Hydra wraps the constructor's ValueError; the message reaches the user unchanged.
    with pytest.raises(Exception, match=says):
        build(cfg)


def test_unknown_drop_encoder_is_named(tmp_path):
    cfg = _compose(tmp_path, ["+experiment=shapes", "training.drop_encoders=[dino]", "task.num_train=4"])
    # Hydra wraps the constructor's ValueError; the message reaches the user unchanged.
    with pytest.raises(Exception, match=r"\['dino'\].*allowed: \['clip_tiny', 'dino_tiny', 'vit_tiny'\]"):
        build(cfg)


# ---- entry points as subprocesses ---------------------------------------------------------------

SMALL = ["task.num_train=24", "task.num_val=8", "task.num_test=8", "data.num_workers=0", "data.batch_size=16"]


def _run(script, args, tmp_path, timeout=600, stdout: Path | None = None):
    """``python <script> <args>``; with ``stdout`` its standard output goes to that file (as in a batch job's
    log: not a terminal) and the result's ``stdout`` is None."""
    env = dict(os.environ, FUSION_DATA_DIR=str(tmp_path / "data"), FUSION_CACHE_DIR=str(tmp_path / "cache"))
    command = [sys.executable, str(ROOT / script), *args]
    if stdout is None:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    with stdout.open("w") as out:
        return subprocess.run(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)


def _wandb_summary(run_dir: Path) -> dict:
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run(
        [str(wandb_bin), "leet", "inspect", "--summary", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _wandb_run_record(run_dir: Path) -> dict:
    """The ``run`` record of an offline wandb run (project, group, id...), read back by wandb itself."""
    wandb_bin = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_bin), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return next(r["run"] for r in map(json.loads, out.stdout.splitlines()) if r.get("type") == "run")


def test_train_then_eval_end_to_end(tmp_path):
    run_dir = tmp_path / "train_run"
    # stdout to a file, as in a SLURM job's .out: progress comes as log lines (a line every 2 of the 10 steps).
    proc = _run(
        "train.py",
        ["+experiment=shapes", "logger=wandb", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}",
         "callbacks.progress.every_n_steps=2", *SMALL],
        tmp_path, stdout=tmp_path / "train.out",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = (tmp_path / "train.out").read_text()
    progress = re.findall(r"train step (\d+)/10 \(\d+%\) \| epoch (\d)/2 batch \d/5 \| train/loss [\d.]+ .*"
                          r"\| [\d.]+ samples/s \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d", out)
    assert progress == [("2", "1"), ("4", "1"), ("6", "2"), ("8", "2"), ("10", "2")], out
    assert re.search(r"epoch 2/2 done at step 10 in \S+ \| .*val/acc [\d.]+", out), out
    # No bar redrawn with carriage returns in the log: generating the shapes data and loading the text model's
    # weights log lines too (fusion.counter; transformers' bar is off off a terminal).
    assert "\r" not in out + proc.stderr
    assert re.search(r"shapes train: \d+/\d+ img \(100%\)", out + proc.stderr)
    # The frozen encoders' eval mode is explained once by fusion, not warned about by Lightning.
    assert "modules of the frozen encoders are in eval mode on purpose" in out
    assert "modules that train are in eval mode" not in out  # the text model trains in train mode
    assert "in eval mode at the start of training" not in proc.stderr + out

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/acc", "test/acc", "val/loss", "val/majority_acc", "val/acc_color"):
        assert key in metrics, key
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    assert (run_dir / "config_resolved.yaml").is_file()

    stats = json.loads((run_dir / "attention" / "val" / "attention.json").read_text())
    assert stats["groups"] == [*TINY, "text", "cls"]
    for layer in stats["cls"]:
        for head in layer:
            assert abs(sum(head) - 1) < 1e-4
    for name in ("attention.csv", "attention_cls_layers.png", "attention_text_heads.png"):
        assert (run_dir / "attention" / "val" / name).is_file()
    assert (run_dir / "attention" / "test" / "attention.json").is_file()

    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    summary = _wandb_summary(offline[0])
    assert "val/acc" in summary["summary"] and "attn/cls/layer0/dino_tiny" in summary["summary"]
    assert "fusion.tasks.shapes.ShapesTask" in json.dumps(summary["config"])  # the resolved config
    assert _wandb_run_record(offline[0])["run_group"] == "shapes"  # a single run: its experiment's group

    # Resume from last.ckpt: training continues at epoch 2 instead of starting over.
    resumed = tmp_path / "resumed"
    proc = _run(
        "train.py",
        ["+experiment=shapes", "logger=csv", "trainer.max_epochs=3",
         f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={resumed}", *SMALL],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and "encoder_fingerprints" in last
    assert not any(k.startswith("encoders.") for k in last["state_dict"])
    steps_per_epoch = 24 * 3 // 16 + (24 * 3 % 16 > 0)
    assert last["global_step"] == 3 * steps_per_epoch

    # Evaluate the checkpoint on test with a dropped encoder, the way a user does.
    eval_dir = tmp_path / "eval_run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = _run(
        "eval.py",
        ["+experiment=shapes", f"ckpt_path={ckpt}", "split=test", "training.drop_encoders=[dino_tiny]",
         f"hydra.run.dir={eval_dir}", *SMALL],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert "test/acc" in metrics and "test/majority_acc" in metrics
    predictions = json.loads((eval_dir / "predictions.json").read_text())
    assert len(predictions) == 8 * 3 and set(predictions[0]) == {"question_id", "answer"}
    stats = json.loads((eval_dir / "attention" / "test" / "attention.json").read_text())
    dino = stats["groups"].index("dino_tiny")
    assert all(head[dino] == 0 for layer in stats["cls"] for head in layer)
    assert stats["drop_encoders"] == ["dino_tiny"]

    # The checkpoint refuses encoders it was not trained with, and says which.
    proc = _run(
        "eval.py",
        ["+experiment=shapes", f"ckpt_path={ckpt}", "encoder.vit_tiny.init_seed=7",
         f"hydra.run.dir={tmp_path / 'bad_eval'}", *SMALL],
        tmp_path,
    )
    assert proc.returncode != 0
    assert "vit_tiny" in proc.stderr and "differs" in proc.stderr
    assert not (tmp_path / "bad_eval" / "metrics.json").exists()


def test_unknown_encoder_in_a_list_is_named_with_the_options(tmp_path):
    proc = _run("train.py", ["+experiment=shapes", "encoder=[clip_tiny,nope]"], tmp_path)
    assert proc.returncode != 0
    assert "unknown encoder 'nope'" in proc.stderr and "clip_tiny, dino, dino_tiny" in proc.stderr


def test_extract_in_shards_then_train_from_the_cache(tmp_path):
    common = ["+experiment=shapes", *SMALL, "encoder=[clip_tiny,dino_tiny]", "cache.num_workers=0"]
    for shard in (0, 1):
        proc = _run(
            "eval.py",
            ["mode=extract", *common, f"cache.shard={shard}", "cache.num_shards=2", f"hydra.run.dir={tmp_path / 'x'}"],
            tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    features = tmp_path / "cache" / "features"
    assert len(list(features.glob("clip_tiny-*.shard-*-of-002"))) == 2
    written = json.loads((tmp_path / "x" / "caches.json").read_text())
    assert written["splits"] == ["train", "val", "test"] and set(written["caches"]) == {"clip_tiny", "dino_tiny"}

    # Training with the cache and no rebuilding merges the shards and never needs the encoders' pixels.
    # callbacks.attention_stats=null: the statistics are computed but no callback writes them.
    train = ["logger=csv", "trainer.max_epochs=1", "callbacks.attention_stats=null", "cache.enabled=true"]
    run = tmp_path / "run"
    proc = _run("train.py", [*common, *train, "cache.rebuild=false", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"val/acc", "test/acc"} <= set(json.loads((run / "metrics.json").read_text()))
    assert not (run / "attention").exists()
    merged = [p for p in features.glob("clip_tiny-*") if p.is_dir() and ".shard-" not in p.name]
    assert len(merged) == 1 and (merged[0] / "COMPLETE").is_file()

    # Other weights (another init seed) never read the old cache: with rebuild=false the run stops, naming
    # the fields that differ.
    proc = _run(
        "train.py", [*common, *train, "cache.rebuild=false", "encoder.clip_tiny.init_seed=5", f"hydra.run.dir={run}2"],
        tmp_path,
    )
    assert proc.returncode != 0
    assert "no feature cache for the configured encoder 'clip_tiny'" in proc.stderr and "sha256" in proc.stderr


def test_a_pooled_cache_needs_the_same_pooling_in_the_model(tmp_path):
    from fusion.run.commands import cache_settings

    cfg = _compose(tmp_path, ["+experiment=shapes", "cache.enabled=true", "cache.tokens_per_encoder=4"])
    with pytest.raises(ValueError, match=r"cache.tokens_per_encoder=4 .* but fusion.tokens_per_encoder=None"):
        cache_settings(cfg)  # before any cache is built
    cfg = _compose(tmp_path, ["+experiment=shapes", "cache.enabled=true", "cache.tokens_per_encoder=4",
                              "fusion.tokens_per_encoder=4"])
    assert cache_settings(cfg).tokens_per_encoder == 4
    # A full cache serves any pooling of the model.
    cfg = _compose(tmp_path, ["+experiment=shapes", "cache.enabled=true", "fusion.tokens_per_encoder=4"])
    assert cache_settings(cfg).tokens_per_encoder is None


def test_extract_builds_the_configured_storage(tmp_path):
    args = ["mode=extract", "+experiment=shapes", *SMALL, "encoder=[clip_tiny]", "cache.num_workers=0",
            "cache.dtype=int8", "cache.tokens_per_encoder=4", f"hydra.run.dir={tmp_path / 'x'}"]
    proc = _run("eval.py", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = json.loads((tmp_path / "x" / "caches.json").read_text())["caches"].values()
    meta = json.loads((Path(folder) / "meta.json").read_text())
    # clip_tiny: [CLS] + a 4 x 4 grid pooled to 2 x 2: 5 tokens a row, stored as int8.
    assert meta["shape"][1] == 5 and meta["dtype"] == "int8", meta


def test_eval_names_a_missing_checkpoint(tmp_path):
    proc = _run("eval.py", ["+experiment=shapes", "ckpt_path=/no/such.ckpt", *SMALL], tmp_path)
    assert proc.returncode != 0 and "/no/such.ckpt" in proc.stderr


def test_eval_names_a_ckpt_path_that_is_not_a_checkpoint(tmp_path):
    notes = tmp_path / "best.ckpt"
    notes.write_text("epoch 3 had the best val/acc\n")  # not a checkpoint: torch's unpickler said KeyError: 101
    proc = _run("eval.py", ["+experiment=shapes", f"ckpt_path={notes}", f"hydra.run.dir={tmp_path / 'out'}", *SMALL],
                tmp_path)
    assert proc.returncode != 0
    assert (f"ckpt_path={str(notes)!r} is a text file (it begins 'epoch 3 had the best val/acc'); expected a "
            "Lightning checkpoint written by train.py") in proc.stderr, proc.stderr[-3000:]
    assert "KeyError" not in proc.stderr and not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_shapes_trains_past_twice_the_majority_baseline(tmp_path):
    run_dir = tmp_path / "shapes"
    # The embedded default's model and data, two of its eight epochs (the schedule over two): one epoch already
    # reaches about six times the majority accuracy (0.59 vs 0.09 val/acc), so the full eight (12 minutes on
    # one thread of a busy CI machine) would only slow CI; about 3 minutes here.
    proc = _run("train.py", ["+experiment=shapes", "logger=csv", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
                tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(metrics)
    assert metrics["val/acc"] >= 2 * metrics["val/majority_acc"]
    assert metrics["test/acc"] >= 2 * metrics["test/majority_acc"]


def test_all_seven_subsets_run_as_one_multirun(tmp_path):
    env_logs = tmp_path / "logs"
    proc = _run(
        "train.py",
        ["+experiment=shapes_subsets", "logger=csv", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
         "test=false", f"paths.log_dir={env_logs}", *SMALL],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p.parent for p in env_logs.glob("train/multiruns/*/*/metrics.json"))
    assert len(jobs) == 7
    groups = {tuple(json.loads((j / "attention" / "val" / "attention.json").read_text())["groups"][:-2]) for j in jobs}
    assert groups == {tuple(s) for s in SUBSETS}


def test_every_fusion_trains_in_one_multirun_and_writes_its_statistics(tmp_path):
    # One sweep over the four strategies: each job trains two steps, validates and tests.
    logs = tmp_path / "logs"
    proc = _run(
        "train.py",
        ["-m", "+experiment=shapes", f"fusion={','.join(FUSIONS)}", "logger=csv", "trainer.max_epochs=1",
         "+trainer.limit_train_batches=2", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
         f"paths.log_dir={logs}", *SMALL],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = sorted(p.parent for p in logs.glob("train/multiruns/*/*/metrics.json"))
    assert len(jobs) == 4
    for job in jobs:
        fusion = (job / ".hydra" / "overrides.yaml").read_text().split("fusion=")[1].split()[0]
        metrics = json.loads((job / "metrics.json").read_text())
        assert "val/acc" in metrics and "test/acc" in metrics, fusion
        for split in ("val", "test"):
            folder = job / "attention" / split
            groups = json.loads((folder / "attention.json").read_text())["groups"]
            mixed = fusion != "token_concat"
            assert groups == [*TINY, *(["fused"] if mixed else []), "text", "cls"], fusion
            assert (folder / "fuser_weights.png").is_file() == mixed, fusion
            if mixed:
                weights = json.loads((folder / "fuser_weights.json").read_text())
                assert weights["encoders"] == TINY and abs(sum(weights["weights"]) - 1) < 1e-4
        # The logger got the fuser weights as scalars (the CSV logger's columns).
        (logged,) = job.glob("csv/version_*/metrics.csv")
        columns = logged.read_text().splitlines()[0].split(",")
        for name in ("fuser/dino_tiny", "test/fuser/dino_tiny"):
            assert (name in columns) == (fusion != "token_concat"), (fusion, name)


FUSION_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "fusion").glob("*.yaml"))


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.mark.parametrize("score", ATTENTION_SCORES)
@pytest.mark.parametrize("fusion", FUSION_CONFIGS)
def test_every_strategy_trains_with_every_score_function(shared_dirs, fusion, score):
    """A few optimisation steps on one shapes batch lower the loss, for each fusion x score combination."""
    cfg = _compose(
        shared_dirs,
        ["+experiment=shapes", f"fusion={fusion}", f"fusion.attention_score={score}", "task.num_train=6",
         "task.num_val=2", "task.num_test=2", "data.batch_size=12", "data.num_workers=0", "training.ve_dropout=0.3"],
    )
    torch.manual_seed(0)
    dm, model = build(cfg)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model.task.loss(model(batch)[0], batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses))  # no NaN
    assert losses[-1] < losses[0]
