"""Exact resume: a run killed mid-epoch and rerun in its folder ends bitwise equal to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion.run.record import RECORD
from fusion.training.resume import CheckpointError, check_compatible, load_checkpoint, resume_path

ROOT = Path(__file__).resolve().parents[1]
# 72 training questions in batches of 16: 5 steps an epoch, 2 epochs; VE-dropout and the head's dropout draw
# from the RNG every step, so a resume that restored the weights but not the RNG or the data order differs.
TINY = [
    "+experiment=shapes", "encoder=[clip_tiny,dino_tiny]", "logger=csv", "task.num_train=24", "task.num_val=8",
    "task.num_test=8", "data.batch_size=16", "data.num_workers=0", "fusion.width=32", "fusion.depth=1",
    "fusion.num_heads=2", "training.ve_dropout=0.3", "training.attention_stats=false", "trainer.max_epochs=2",
    "trainer.deterministic=true", "callbacks.step_checkpoint.every_n_train_steps=1", "callbacks.progress=null",
]


def _train(tmp_path: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, FUSION_DATA_DIR=str(tmp_path / "data"), FUSION_CACHE_DIR=str(tmp_path / "cache"),
        PYTHONPATH=str(ROOT / "tests"),
    )
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *TINY, f"hydra.run.dir={run_dir}", *extra],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    run = tmp / "whole"
    proc = _train(tmp, run)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, run


@pytest.mark.parametrize("kill_at", [7, 5], ids=["mid-epoch", "epoch-boundary"])
def test_killed_run_resumed_in_its_folder_equals_the_uninterrupted_run(uninterrupted, kill_at):
    tmp, whole = uninterrupted
    run = tmp / f"killed_at_{kill_at}"
    kill = ["+callbacks.kill._target_=kill_helper.KillAtStep", f"+callbacks.kill.step={kill_at}"]
    proc = _train(tmp, run, *kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    assert not (run / "metrics.json").exists()
    saved = torch.load(run / "checkpoints" / "last_step.ckpt", weights_only=True)
    assert saved["global_step"] == kill_at
    position = saved["FusionDataModule"]
    assert position == ({"epoch": 1, "batches": 2} if kill_at == 7 else {"epoch": 1, "batches": 0})

    # The same command again in the same folder (what a requeued job does) resumes from its newest checkpoint
    # (at the epoch boundary last.ckpt holds the same step); the kill happens only after training up to it.
    proc = _train(tmp, run, *kill)
    assert proc.returncode == 0, proc.stderr[-4000:]
    newest = ["last_step.ckpt"] if kill_at == 7 else ["last_step.ckpt", "last.ckpt"]
    log = (run / "train.log").read_text()
    assert any(f"resuming from {run / 'checkpoints' / name}" in log for name in newest), log
    resumed, reference = _weights(run), _weights(whole)
    assert resumed.keys() == reference.keys()
    differing = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not differing, differing
    assert json.loads((run / "metrics.json").read_text()) == json.loads((whole / "metrics.json").read_text())
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10 and last["epoch"] == 1


def test_resume_from_another_model_config_names_the_keys(uninterrupted):
    tmp, whole = uninterrupted
    proc = _train(tmp, tmp / "wider", "fusion.width=48", f"ckpt_path={whole / 'checkpoints' / 'last.ckpt'}")
    assert proc.returncode != 0
    assert "was written by a model of another configuration" in proc.stderr
    assert "shape differs: " in proc.stderr and "checkpoint (" in proc.stderr and "vs model (" in proc.stderr


def _save(path: Path, step: int, **extra) -> None:
    """The keys every Lightning checkpoint holds, at ``step``."""
    torch.save({"state_dict": {}, "global_step": step, "pytorch-lightning_version": "2.6", **extra}, path)


def test_resume_path_prefers_ckpt_path_then_the_folders_newest(tmp_path):
    assert resume_path(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        resume_path(str(tmp_path / "nope.ckpt"), tmp_path)
    (tmp_path / "checkpoints").mkdir()
    for name, step in (("checkpoints/last.ckpt", 5), ("checkpoints/last_step.ckpt", 7), ("hpc_ckpt_1.ckpt", 6)):
        _save(tmp_path / name, step)
    assert resume_path(None, tmp_path) == tmp_path / "checkpoints" / "last_step.ckpt"
    assert resume_path(str(tmp_path / "hpc_ckpt_1.ckpt"), tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"


def test_check_compatible_names_missing_unexpected_and_reshaped_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"0.weight": torch.zeros(5, 4), "0.bias": torch.zeros(3), "2.weight": torch.zeros(1)}
    _save(tmp_path / "x.ckpt", 1, state_dict=state)
    with pytest.raises(ValueError) as err:
        check_compatible(tmp_path / "x.ckpt", model)
    message = str(err.value)
    assert "0.weight: checkpoint (5, 4) vs model (3, 4)" in message
    assert "missing from the checkpoint: 1.bias, 1.weight" in message and "not in the model: 2.weight" in message
    _save(tmp_path / "ok.ckpt", 1, state_dict=model.state_dict())
    check_compatible(tmp_path / "ok.ckpt", model)


def test_resume_path_skips_an_unreadable_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _save(folder / "last.ckpt", 5)
    (folder / "last_step.ckpt").write_bytes(b"PK\x03\x04 truncated")  # a checkpoint cut short by a kill
    assert resume_path(None, tmp_path) == folder / "last.ckpt"


def test_resume_falls_back_to_the_newest_readable_checkpoint_of_any_kind(uninterrupted, tmp_path):
    """last*.ckpt unreadable, the best epoch_XXX.ckpt fine: the run resumes from it, not from step 0."""
    _, whole = uninterrupted
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (best,) = (whole / "checkpoints").glob("epoch_*.ckpt")
    (folder / best.name).write_bytes(best.read_bytes())
    last = (whole / "checkpoints" / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(last[: len(last) // 2])  # cut short by a full disk
    (folder / "last_step.ckpt").write_text("step 10\n")  # anything copied in
    assert resume_path(None, tmp_path) == folder / best.name
    # Readable again: last.ckpt (step 10) is newer than the best (step 5 or 10: last wins the tie too).
    (folder / "last.ckpt").write_bytes(last)
    assert resume_path(None, tmp_path) == folder / "last.ckpt"


def test_resume_path_tie_prefers_the_requeue_checkpoint_then_last(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("last_requeue.ckpt", "last.ckpt", "epoch_002.ckpt"):  # written in this order, all at step 8
        _save(folder / name, 8)
    assert resume_path(None, tmp_path) == folder / "last_requeue.ckpt"
    (folder / "last_requeue.ckpt").unlink()
    assert resume_path(None, tmp_path) == folder / "last.ckpt"
    _save(folder / "epoch_002.ckpt", 9)
    assert resume_path(None, tmp_path) == folder / "epoch_002.ckpt"


def _not_checkpoints(folder: Path, real: Path) -> dict[str, tuple[Path, str]]:
    """Files that are not checkpoints, each with what the error must say about it."""
    folder.mkdir(exist_ok=True)
    text = folder / "notes.ckpt"
    text.write_text("epoch 3 was the best one\n")
    cut = folder / "cut.ckpt"
    data = real.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    tensor = folder / "tensor.ckpt"
    torch.save(torch.zeros(3), tensor)
    weights = folder / "weights.pt"
    torch.save({"fusion.weight": torch.zeros(2)}, weights)
    return {
        "text": (text, r"is a text file \(it begins 'epoch 3 was the best one'\)"),
        "truncated": (cut, r"is a zip archive cut short \(\d+ bytes, no central directory"),
        "tensor": (tensor, "is a torch file holding a Tensor, not a checkpoint"),
        "state dict": (weights, r"is a torch file but not a Lightning checkpoint: it lacks \['state_dict', "
                                r"'global_step', 'pytorch-lightning_version'\] \(its keys: fusion.weight\)"),
        "folder": (folder, "is a folder, not a file"),
    }


def test_load_checkpoint_names_the_path_and_what_was_expected(uninterrupted, tmp_path):
    _, whole = uninterrupted
    for kind, (path, says) in _not_checkpoints(tmp_path / "bad", whole / "checkpoints" / "last.ckpt").items():
        with pytest.raises(CheckpointError, match=says) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert f"ckpt_path={str(path)!r}" in message and "expected a Lightning checkpoint" in message, kind
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='.*/nope.ckpt' does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    assert load_checkpoint(whole / "checkpoints" / "last.ckpt")["global_step"] == 10


def test_train_names_a_ckpt_path_that_is_not_a_checkpoint(uninterrupted):
    tmp, whole = uninterrupted
    bad = _not_checkpoints(tmp / "bad_ckpts", whole / "checkpoints" / "last.ckpt")
    text, says = bad["text"]
    proc = _train(tmp, tmp / "from_text", f"ckpt_path={text}")
    assert proc.returncode != 0
    assert f"ckpt_path={str(text)!r} is a text file" in proc.stderr, proc.stderr[-3000:]
    assert "torch.save(_use_new_zipfile_serialization" not in proc.stderr  # torch's advice, beside the point


def test_rerun_in_a_run_folder_with_another_config_is_refused_naming_the_keys(uninterrupted):
    """A finished run's folder, the same command with another training.lr, seed and encoder list: refused before
    anything is written, naming each key with both values; the record and the checkpoints stay as they were."""
    tmp, whole = uninterrupted
    record = (whole / RECORD).read_text()
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (whole / "checkpoints").iterdir()}
    proc = _train(tmp, whole, "training.lr=0.01", "seed=7", "encoder=[clip_tiny]")
    assert proc.returncode != 0
    message = proc.stderr
    assert f"run folder {whole} already holds a run of another config" in message, message[-3000:]
    assert "training.lr: 0.001 vs 0.01" in message and "seed: 42 vs 7" in message
    assert "encoder.dino_tiny: {" in message and "vs absent" in message
    assert (whole / RECORD).read_text() == record
    assert {p.name: p.stat().st_mtime_ns for p in (whole / "checkpoints").iterdir()} == checkpoints
