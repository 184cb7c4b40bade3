"""fusion.study end to end: a tiny real sweep through train.py -m (2 subsets x 2 seeds, one epoch) writes
every file of the report when the multirun ends; the CLI (and the fusion.zoo.study alias) writes it again."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
from entrypoints import FAST, ROOT, run
from zoo_helpers import random_towers

GROUP_FILES = ["jobs.csv", "subsets.csv", "subsets.md", "subsets.png", "summary.json", "leaning.csv", "leaning.md",
               "leaning.png", "leaning_heatmap.png", "agreement.csv", "retrain_vs_mask.png", "utilisation.csv",
               "effective_rank.csv"]


def _cli(module, sweep, cwd, *args):
    return subprocess.run([sys.executable, "-m", module, str(sweep), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_tiny_sweep_writes_the_whole_report_and_the_cli_repeats_it(tmp_path):
    zoo = random_towers(tmp_path / "zoo", ["clip_tiny", "vit_tiny"])
    sweep = tmp_path / "sweep"
    fast = [a for a in FAST if not a.startswith("encoder=")]
    tiny = ["task.num_train=16", "task.num_val=8", "task.num_test=8", "trainer.max_epochs=1",
            "hydra.callbacks.study.max_examples=4"]
    proc = run("train.py", ["+experiment=zoo/complementarity", f"zoo.out_dir={zoo}", "seed=0,1",
                            "encoder=[vit_tiny],[clip_tiny,vit_tiny]", f"hydra.sweep.dir={sweep}", *fast, *tiny],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in ["study.md", *GROUP_FILES]:  # one group (shapes): its files in the sweep folder
        assert (sweep / name).is_file() and (sweep / name).stat().st_size > 0, name
    summary = json.loads((sweep / "summary.json").read_text())
    assert list(summary["groups"]) == ["shapes"] and summary["task"] == "shapes" and summary["seeds"] == [0, 1]
    assert summary["fusion"] == "TokenConcatFuser" and summary["ve_dropout"] == 0.1  # conf/experiment/shapes.yaml

    # The leaning, as the zoo study had it.
    lean = summary["leaning"]
    assert lean["subset"] == "clip_tiny+vit_tiny" and lean["seeds"] == [0, 1] and lean["split"] == "test"
    assert lean["answer_types"] == ["color", "count", "position", "shape"]
    rows = list(csv.DictReader((sweep / "leaning.csv").open()))
    assert [(r["answer_type"], r["encoder"]) for r in rows[:2]] == [("all", "clip_tiny"), ("all", "vit_tiny")]
    for t in ["all", *lean["answer_types"]]:  # shares of one softmax
        masses = [float(r["attention_cls"]) for r in rows if r["answer_type"] == t]
        assert all(0 < m < 1 for m in masses) and sum(masses) < 1
    job = next(j for j in lean["jobs"] if j["seed"] == 0)
    ablation = json.loads((sweep / job["job"] / "leaning" / "encoder_ablation" / "results.json").read_text())
    subsets = ablation["subsets"]
    expected = subsets["clip_tiny+vit_tiny"]["acc_shape"] - subsets["clip_tiny"]["acc_shape"]
    assert lean["by_type"]["shape"]["encoders"]["vit_tiny"]["drop_when_removed"]["per_seed"]["0"] == pytest.approx(
        expected)

    # Retrain vs mask: the full subset is the same checkpoint scored twice (difference 0); vit_tiny's masked
    # score is the all-encoder job's clip-masked row; two subsets per seed.
    agreement = summary["agreement"]
    jobs = {(r["subset"], r["seed"]): r for r in csv.DictReader((sweep / "jobs.csv").open())}
    full0 = float(jobs[("clip_tiny+vit_tiny", "0")]["test/acc"])
    assert agreement["difference"]["clip_tiny+vit_tiny"]["per_seed"]["0"] == pytest.approx(0.0, abs=1e-6)
    assert subsets["clip_tiny+vit_tiny"]["acc"] == pytest.approx(full0, abs=1e-6)
    vit0 = float(jobs[("vit_tiny", "0")]["test/acc"])
    assert agreement["difference"]["vit_tiny"]["per_seed"]["0"] == pytest.approx(subsets["vit_tiny"]["acc"] - vit0)
    assert agreement["per_seed"]["0"]["n"] == 2 and agreement["not_retrained"] == ["clip_tiny"]
    assert len(list(csv.DictReader((sweep / "agreement.csv").open()))) == 4  # 2 subsets x 2 seeds

    # Utilisation: Capacity / Necessity as the jobs' and the ablation's numbers; effective ranks per job.
    util = summary["utilisation"]["by_encoder"]
    assert util["vit_tiny"]["capacity_retrained"]["per_seed"]["0"] == pytest.approx(vit0)
    assert util["vit_tiny"]["capacity_masked"]["per_seed"]["0"] == pytest.approx(subsets["vit_tiny"]["acc"])
    assert util["clip_tiny"]["necessity_retrained"]["per_seed"]["0"] == pytest.approx(full0 - vit0)
    assert util["clip_tiny"]["capacity_retrained"] is None  # no clip_tiny job in this sweep
    assert util["vit_tiny"]["changed"]["per_seed"]["0"] == ablation["masking"]["vit_tiny"]["changed"]
    ranks = summary["effective_rank"]
    assert len(ranks) == 4 and all(r["examples"] >= 4 for r in ranks.values())
    for r in ranks.values():  # between 1 and the width (32 after the projection)
        assert all(1 <= v <= r["width"][e] for e, v in r["features"].items())
        assert all(1 <= v <= 32 for v in r["projected"].values())
    md = (sweep / "study.md").read_text()
    assert "| subset | shapes |" in md and "## Retrain vs mask" in md and "| vit_tiny | " in md

    # The CLI from another folder (relative paths resolve against the folder the sweep ran in), with wandb.
    first = (sweep / "leaning.csv").read_text()
    for name in ["study.md", *GROUP_FILES]:
        (sweep / name).unlink()
    shutil.rmtree(sweep / job["job"] / "leaning")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli = _cli("fusion.study", sweep, elsewhere, "--max-examples", "4", "--wandb")
    assert cli.returncode == 0, cli.stderr[-4000:]
    assert (sweep / "leaning.csv").read_text() == first
    again = json.loads((sweep / "summary.json").read_text())
    assert again["agreement"]["per_seed"] == agreement["per_seed"]
    run_dir = sweep / "study_wandb" / "wandb"
    (offline,) = run_dir.glob("offline-run-*")
    media = offline / "files" / "media"
    # Images: subsets, retrain_vs_mask, leaning_heatmap; tables: subsets_by_group, agreement, utilisation.
    assert len(list(media.rglob("*.png"))) == 3 and len(list(media.rglob("*.table.json"))) == 3
    # The old module still runs the study, saying where it moved.
    alias = _cli("fusion.zoo.study", sweep, elsewhere, "--no-leaning")
    assert alias.returncode == 0 and "moved to fusion.study" in alias.stderr
