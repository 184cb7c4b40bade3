"""The zoo through train.py, as a user runs it: pretrain all three towers, then the subset study on them."""

import csv
import json

import pytest
from entrypoints import FAST, run
from omegaconf import OmegaConf
from safetensors import safe_open
from zoo_helpers import image_folder

from fusion.zoo.entry import use_zoo_weights

RECIPES = ["clip_tiny", "dino_tiny", "vit_tiny"]
SHORT = [
    "logger=csv",
    "zoo.report_scenes.num_train=32",
    "zoo.report_scenes.num_test=16",
    *(f"zoo.recipe.{n}.{k}" for n in RECIPES for k in (
        "trainer.max_steps=2", "trainer.val_check_interval=2", "data.batch_size=4", "data.num_val=4",
        "data.num_workers=0",
    )),
]


@pytest.mark.slow
def test_zoo_all_then_complementarity(tmp_path):
    zoo = run("train.py", ["+experiment=zoo/all", *SHORT], tmp_path)
    assert zoo.returncode == 0, zoo.stderr[-3000:]
    for name in RECIPES:
        assert (tmp_path / "zoo" / f"{name}.safetensors").is_file()
    report = json.loads((tmp_path / "zoo" / "report.json").read_text())
    assert set(report["probe"]) == {*RECIPES, *(f"{n}@init" for n in RECIPES)}
    assert "clip_tiny|dino_tiny" in report["cka"]

    task = ["task.num_train=16", "task.num_val=8", "task.num_test=8", "trainer.max_epochs=1"]
    fast = [a for a in FAST if not a.startswith("encoder=")]
    # One seed: the study config sweeps three by default (21 jobs).
    study = run("train.py", ["+experiment=zoo/complementarity", "seed=0", *fast, *task], tmp_path)
    assert study.returncode == 0, study.stderr[-3000:]
    (table,) = (tmp_path / "logs" / "train" / "multiruns").glob("*/subsets.csv")
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 7 and rows[-1]["subset"] == "clip_tiny+dino_tiny+vit_tiny"
    resolved = OmegaConf.load(table.parent / "0" / "config_resolved.yaml")
    assert resolved.encoder.clip_tiny.weights.endswith("zoo/clip_tiny.safetensors")
    assert (table.parent / "subsets.png").is_file() and (table.parent / "summary.json").is_file()
    lean = json.loads((table.parent / "summary.json").read_text())["leaning"]
    assert lean["subset"] == "clip_tiny+dino_tiny+vit_tiny" and lean["seeds"] == [0]
    assert (table.parent / "leaning.md").is_file() and (table.parent / "leaning.png").is_file()


def test_missing_zoo_weights_say_how_to_build_them(tmp_path):
    cfg = OmegaConf.create({"encoder": {"clip_tiny": {"weights": None}}, "zoo": {"weights": {"clip_tiny": "nope.st"}}})
    with pytest.raises(FileNotFoundError, match=r"'nope\.st'.*\+experiment=zoo/all"):
        use_zoo_weights(cfg)
    cfg.zoo.weights = {"vit_tiny": "x"}
    with pytest.raises(ValueError, match="no file for encoder 'clip_tiny'"):
        use_zoo_weights(cfg)


@pytest.mark.parametrize("name", ["clip_tiny", "dino_tiny"])
def test_recipe_trains_on_an_image_folder_through_train_py(tmp_path, name):
    # 12 images: 1 held out for val, 11 for training = 2 full batches of 4.
    folder = image_folder(tmp_path / "imgs", 12)
    short = [a for a in SHORT if not a.startswith("zoo.recipe.") or a.startswith(f"zoo.recipe.{name}.")]
    proc = run("train.py", [f"+experiment=zoo/{name}", f"zoo.recipe.{name}.data.folder={folder}", "zoo.report=false",
                            "zoo.callbacks.progress.every_n_steps=1", *short], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Not a terminal (a batch log): progress comes as log lines, one per step here.
    out = proc.stdout + proc.stderr
    assert "training from step 0 of 2" in out and "train step 2/2 (100%)" in out, out[-3000:]
    with safe_open(str(tmp_path / "zoo" / f"{name}.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["global_step"]) == 2


def test_image_folder_smaller_than_a_batch_stops_train_py_before_training(tmp_path):
    folder = image_folder(tmp_path / "imgs", 4)  # 3 training images after the val hold-out, batch 4
    short = [a for a in SHORT if not a.startswith("zoo.recipe.") or a.startswith("zoo.recipe.dino_tiny.")]
    args = ["+experiment=zoo/dino_tiny", f"zoo.recipe.dino_tiny.data.folder={folder}", *short]
    proc = run("train.py", args, tmp_path)
    assert proc.returncode != 0
    assert f"image folder '{folder}': 4 image(s), 3 for training" in proc.stderr and "batch_size=4" in proc.stderr
    assert not (tmp_path / "zoo" / "dino_tiny.safetensors").exists()  # no random init saved as if trained
