"""A run folder's record (config_resolved.yaml): compared before it is written, never overwritten by another
config. The same check through train.py, on a finished run's folder: tests/test_training_resume.py."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fusion.run.record import RECORD, RecordMismatch, differences, save_record

ROOT = Path(__file__).resolve().parents[1]


def _cfg(run: Path, *overrides: str, config: str = "train"):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config, overrides=["+experiment=shapes", f"paths.output_dir={run}", *overrides])


@pytest.fixture()
def recorded(tmp_path) -> tuple[Path, str]:
    """A training run folder with its record; the record's text."""
    run = tmp_path / "run"
    save_record(_cfg(run), run)
    return run, (run / RECORD).read_text()


def test_the_same_config_resumes_whatever_checkpoint_it_names(recorded):
    run, text = recorded
    save_record(_cfg(run), run)  # a requeued job: the same command
    save_record(_cfg(run, f"ckpt_path={run}/checkpoints/last.ckpt", "paths.log_dir=/elsewhere/logs",
                     "callbacks.progress.every_seconds=5"), run)
    assert (run / RECORD).read_text() == text


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["training.lr=0.01"], ["training.lr: 0.001 vs 0.01"]),
        (["seed=7", "training.lr=fast"], ["seed: 42 vs 7", "training.lr: 0.001 vs fast"]),
        (["encoder=[clip_tiny,dino_tiny]"], ["encoder.vit_tiny: {_target_: fusion.encoders.vision.TimmEncoder, "]),
        (["encoder=[dino_tiny,clip_tiny,vit_tiny]"],
         ["encoder: order ['clip_tiny', 'dino_tiny', 'vit_tiny'] vs ['dino_tiny', 'clip_tiny', 'vit_tiny']"]),
        (["+training.extra=1"], ["training.extra: absent vs 1"]),
    ],
    ids=["lr", "seed and lr", "encoder removed", "encoder order", "key added"],
)
def test_another_config_is_refused_naming_each_key_and_the_record_is_kept(recorded, overrides, says):
    run, text = recorded
    with pytest.raises(RecordMismatch) as err:
        save_record(_cfg(run, *overrides), run)
    message = str(err.value)
    assert message.startswith(f"run folder {run} already holds a run of another config")
    assert all(s in message for s in says), message
    assert f"ckpt_path={run}/checkpoints/last.ckpt" in message  # how to start a new run from its weights
    assert (run / RECORD).read_text() == text


def test_an_evaluation_folder_may_be_rewritten_but_not_a_training_one(recorded, tmp_path):
    out = tmp_path / "eval"
    save_record(_cfg(out, "split=val", config="eval"), out)
    save_record(_cfg(out, "split=test", config="eval"), out)  # the same folder, another split: as before
    assert "split: test" in (out / RECORD).read_text()
    run, text = recorded
    with pytest.raises(RecordMismatch, match="task_name: train vs eval"):
        save_record(_cfg(run, config="eval"), run)
    assert (run / RECORD).read_text() == text


def test_an_unreadable_record_is_named_and_kept(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / RECORD).write_text("model: [unclosed\n")
    with pytest.raises(RecordMismatch, match=rf"{run / RECORD} \(this run folder's record of its config\) is not "
                                             "readable YAML"):
        save_record(_cfg(run), run)
    assert (run / RECORD).read_text() == "model: [unclosed\n"


def test_differences_name_a_missing_subtree_once_and_skip_ignored_keys():
    old = {"a": {"b": 1, "c": {"d": [1, 2]}}, "ckpt_path": None, "paths": {"log_dir": "x", "data_dir": "d"}}
    new = {"a": {"b": 2}, "ckpt_path": "y.ckpt", "paths": {"log_dir": "z", "data_dir": "e"}}
    assert differences(old, new) == ["a.b: 1 vs 2", "a.c: {d: [1, 2]} vs absent", "paths.data_dir: d vs e"]
    assert differences(old, old) == []
