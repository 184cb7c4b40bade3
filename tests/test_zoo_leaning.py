"""The zoo study's leaning: which encoder the fused model leans on per answer type (fusion.zoo.leaning)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from entrypoints import FAST, ROOT, run
from zoo_helpers import random_towers

from fusion.zoo.leaning import leaning


def _analysed(job, seed, cls, acc_without):
    """One job's analyses as analyse_job returns them: encoders a, b; 1 layer x 2 heads.

    ``cls``: {type: (mass a, mass b)} (the two heads differ by +-0.1, so their mean is the value);
    ``acc_without``: {subset without one encoder: {type: acc}}; the full model has acc 0.9 on every type.
    """
    def heads(a, b):
        return [[[a + 0.1, b, 0.8 - a - b, 0.1], [a - 0.1, b, 1.0 - a - b, 0.1]]]

    by = {t: {"n": 5, "cls": heads(*m), "text": heads(0.3, 0.3)} for t, m in cls.items()}
    attention = {"encoders": ["a", "b"], "groups": ["a", "b", "text", "cls"], "split": "test",
                 "split_by": "answer_type", "metrics": {"n": 10.0}, "by": by, "cls": heads(0.3, 0.3),
                 "text": heads(0.3, 0.3), "tokens_per_image": {"a": 17, "b": 17}}
    full = {"acc": 0.9, "acc_color": 0.9, "acc_shape": 0.9}
    subsets = {"a+b": full, **{name: {"acc": 0.9, **{f"acc_{t}": v for t, v in accs.items()}}
                               for name, accs in acc_without.items()}}
    return {"job": job, "seed": seed, "checkpoint": "checkpoints/epoch_000.ckpt", "checkpoint_kind": "best",
            "attention": attention, "encoder_ablation": {"metric": "acc", "subsets": subsets}}


def test_leaning_aggregates_attention_and_dropout_per_answer_type_over_seeds():
    jobs = [
        _analysed("6", 0, {"color": (0.5, 0.2), "shape": (0.1, 0.6)}, {"b": {"color": 0.5, "shape": 0.9},
                                                                        "a": {"color": 0.9, "shape": 0.3}}),
        _analysed("s1_0", 1, {"color": (0.3, 0.2), "shape": (0.1, 0.4)}, {"b": {"color": 0.7, "shape": 0.9},
                                                                          "a": {"color": 0.9}}),
    ]
    result = leaning(jobs)
    assert result["answer_types"] == ["color", "shape"] and result["seeds"] == [0, 1]
    assert result["split"] == "test" and result["metric"] == "acc" and result["subset"] == "a+b"
    color, shape, everything = result["by_type"]["color"], result["by_type"]["shape"], result["by_type"]["all"]
    assert color["n"] == 5 and everything["n"] == 10
    cls_a = color["encoders"]["a"]["attention_cls"]
    assert cls_a["mean"] == pytest.approx(0.4) and cls_a["std"] == pytest.approx(math.sqrt(0.02))
    assert cls_a["per_seed"] == pytest.approx({"0": 0.5, "1": 0.3})
    assert shape["encoders"]["b"]["attention_cls"]["mean"] == pytest.approx(0.5)
    assert color["leans_on"]["attention_cls"] == "a" and shape["leans_on"]["attention_cls"] == "b"
    # Drop when removed: full (0.9) minus the model without the encoder, paired within the job.
    assert color["encoders"]["a"]["drop_when_removed"]["per_seed"] == pytest.approx({"0": 0.4, "1": 0.2})
    assert color["encoders"]["b"]["drop_when_removed"]["mean"] == pytest.approx(0.0)
    # Seed 1's model without b has no shape accuracy (no such example): only seed 0 counts.
    drop_b = shape["encoders"]["b"]["drop_when_removed"]
    assert drop_b["per_seed"] == pytest.approx({"0": 0.6}) and drop_b["n"] == 1 and drop_b["std"] is None
    assert color["leans_on"]["drop_when_removed"] == "a" and shape["leans_on"]["drop_when_removed"] == "b"
    assert everything["leans_on"]["drop_when_removed"] == "tie"  # no drop at all


def test_study_writes_the_leaning_of_the_all_encoder_jobs_and_the_cli_does_too(tmp_path):
    """A tiny real sweep through train.py: 2 subsets x 2 seeds, the leaning of the two clip+vit jobs."""
    zoo = random_towers(tmp_path / "zoo", ["clip_tiny", "vit_tiny"])
    sweep = tmp_path / "sweep"
    fast = [a for a in FAST if not a.startswith("encoder=")]
    tiny = ["task.num_train=16", "task.num_val=8", "task.num_test=8", "trainer.max_epochs=1"]
    proc = run("train.py", ["+experiment=zoo/complementarity", f"zoo.out_dir={zoo}", "seed=0,1",
                            "encoder=[vit_tiny],[clip_tiny,vit_tiny]", f"hydra.sweep.dir={sweep}", *fast, *tiny],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((sweep / "summary.json").read_text())
    lean = summary["leaning"]
    assert lean["subset"] == "clip_tiny+vit_tiny" and lean["seeds"] == [0, 1] and lean["split"] == "test"
    assert sorted((j["seed"], j["checkpoint_kind"]) for j in lean["jobs"]) == [(0, "best"), (1, "best")]
    assert lean["answer_types"] == ["color", "count", "position", "shape"]
    rows = list(csv.DictReader((sweep / "leaning.csv").open()))
    assert [(r["answer_type"], r["encoder"]) for r in rows[:2]] == [("all", "clip_tiny"), ("all", "vit_tiny")]
    assert len(rows) == 2 * 5 and {r["seeds"] for r in rows} == {"0,1"}
    # Attention masses are shares of one softmax: each encoder's in (0, 1), both together below 1.
    for t in ["all", *lean["answer_types"]]:
        masses = [float(r["attention_cls"]) for r in rows if r["answer_type"] == t]
        assert all(0 < m < 1 for m in masses) and sum(masses) < 1
    # The drop is the job's own encoder_ablation report: full model minus the model without the encoder.
    job = next(j for j in lean["jobs"] if j["seed"] == 0)
    ablation = json.loads((sweep / job["job"] / "leaning" / "encoder_ablation" / "results.json").read_text())
    subsets = ablation["subsets"]
    expected = subsets["clip_tiny+vit_tiny"]["acc_shape"] - subsets["clip_tiny"]["acc_shape"]
    assert lean["by_type"]["shape"]["encoders"]["vit_tiny"]["drop_when_removed"]["per_seed"]["0"] == pytest.approx(
        expected)
    assert (sweep / "leaning.png").stat().st_size > 0
    assert "| position |" in (sweep / "leaning.md").read_text()

    # The CLI, from another folder (the jobs' relative paths resolve against the folder the sweep ran in).
    first = (sweep / "leaning.csv").read_text()
    for name in ("leaning.csv", "leaning.md", "leaning.png"):
        (sweep / name).unlink()
    shutil.rmtree(sweep / job["job"] / "leaning")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli = subprocess.run([sys.executable, "-m", "fusion.zoo.study", str(sweep)], cwd=elsewhere, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0, cli.stderr[-4000:]
    assert (sweep / "leaning.csv").read_text() == first
    assert json.loads((sweep / "summary.json").read_text())["leaning"]["by_type"] == lean["by_type"]
