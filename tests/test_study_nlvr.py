"""fusion.study on NLVR v1 (+experiment=zoo/complementarity_nlvr) through train.py, on tiny official-format data."""

import csv
import json

from entrypoints import FAST, run
from omegaconf import OmegaConf
from test_nlvr import write_nlvr
from zoo_helpers import random_towers


def test_complementarity_nlvr_sweeps_subsets_and_seeds_into_one_table(tmp_path):
    root = write_nlvr(tmp_path / "nlvr")
    zoo = random_towers(tmp_path / "zoo", ["clip_tiny", "vit_tiny"])
    sweep = tmp_path / "sweep"
    fast = [a for a in FAST if not a.startswith("encoder=")]
    proc = run(
        "train.py",
        ["+experiment=zoo/complementarity_nlvr", f"task.root={root}", "task.val_from_train=0.3",
         f"zoo.out_dir={zoo}", "encoder=[vit_tiny],[clip_tiny,vit_tiny]", "seed=0,1", "trainer.max_epochs=1",
         f"hydra.sweep.dir={sweep}", *fast],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = list(csv.DictReader((sweep / "jobs.csv").open()))
    assert sorted((j["subset"], j["seed"]) for j in jobs) == [
        ("clip_tiny+vit_tiny", "0"), ("clip_tiny+vit_tiny", "1"), ("vit_tiny", "0"), ("vit_tiny", "1")]
    resolved = OmegaConf.load(sweep / "0" / "config_resolved.yaml")
    assert resolved.task._target_ == "fusion.tasks.nlvr.NLVRTask"
    assert resolved.encoder.vit_tiny.weights == str(zoo / "vit_tiny.safetensors")

    table = list(csv.DictReader((sweep / "subsets.csv").open()))
    assert [(r["subset"], r["n"], r["seeds"]) for r in table] == [("vit_tiny", "2", "0,1"),
                                                                  ("clip_tiny+vit_tiny", "2", "0,1")]
    assert {"test/acc", "test/acc:std", "test/acc_consistency"} <= set(table[0])
    md = (sweep / "subsets.md").read_text()
    assert "test/acc_consistency (mean)" in md and "| vit_tiny | 2 |" in md
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["metric"] == "test/acc" and summary["seeds"] == [0, 1]
    assert summary["best_single"]["subset"] == "vit_tiny" and summary["best_fused"]["subset"] == "clip_tiny+vit_tiny"
    assert set(summary["fused_gain_per_seed"]) == {"0", "1"}
    assert (sweep / "subsets.png").stat().st_size > 0
    # NLVR has no answer types: the leaning is the whole split's only.
    assert summary["leaning"]["answer_types"] == [] and list(summary["leaning"]["by_type"]) == ["all"]
    rows = list(csv.DictReader((sweep / "leaning.csv").open()))
    assert [(r["answer_type"], r["encoder"]) for r in rows] == [("all", "clip_tiny"), ("all", "vit_tiny")]
