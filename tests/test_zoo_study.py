"""The subset study's collection: a sweep folder's jobs (subsets x seeds) -> table, plot and summary."""

import csv
import itertools
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from entrypoints import FAST, ROOT, run
from zoo_helpers import random_towers

from fusion.zoo.study import aggregate, collect, leaning, spread, summarize, write_study

TINY = ["clip_tiny", "dino_tiny", "vit_tiny"]
SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations(TINY, r)]
NAMES = ["+".join(s) for s in SUBSETS]


def _job(folder, subset, acc, seed=None):
    folder.mkdir(parents=True)
    config = {"encoder": {n: {"name": n} for n in subset}}
    if seed is not None:
        config["seed"] = seed
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    metrics = {"test/acc": acc, "val/acc": acc - 0.01, "test/acc_color": acc / 2, "test/majority_acc": 0.2}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def _sweep(tmp_path, accs):
    """One job per subset, no seed in the config (as a one-seed sweep without a seed override)."""
    for job, (subset, acc) in enumerate(zip(SUBSETS, accs, strict=True)):
        _job(tmp_path / str(job), subset, acc)
    return tmp_path


# test/acc per subset (SUBSETS order) for seeds 0, 1, 2; chosen so every mean / std is exact by hand.
SEEDED = [
    [0.50, 0.60, 0.70],  # clip: mean 0.60, std 0.10
    [0.40, 0.40, 0.40],  # dino: 0.40, std 0
    [0.52, 0.62, 0.57],  # vit: 0.57, std 0.05
    [0.45, 0.45, 0.45],  # clip+dino
    [0.58, 0.64, 0.76],  # clip+vit: 0.66 (best fused); minus clip per seed: 0.08, 0.04, 0.06
    [0.50, 0.50, 0.50],  # dino+vit
    [0.55, 0.61, 0.73],  # all three: 0.63; minus clip per seed: 0.05, 0.01, 0.03
]


def _seeded_sweep(tmp_path, drop=()):
    """Jobs numbered as the config's sweep numbers them: seeds vary slowest. ``drop``: (subset, seed) not run."""
    job = 0
    for seed in range(3):
        for subset, accs in zip(SUBSETS, SEEDED, strict=True):
            if ("+".join(subset), seed) not in drop:
                _job(tmp_path / str(job), subset, accs[seed], seed)
            job += 1
    return tmp_path


def test_spread_is_the_sample_std_and_empty_for_one_value():
    assert spread([0.5, 0.6, 0.7]) == pytest.approx({"mean": 0.6, "std": 0.1, "min": 0.5, "max": 0.7, "n": 3})
    assert spread([0.5]) == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5, "n": 1}


def test_one_seed_table_plot_and_summary_say_whether_fusion_beats_one_encoder(tmp_path):
    sweep = _sweep(tmp_path, [0.50, 0.40, 0.45, 0.62, 0.55, 0.48, 0.66])
    summary = write_study(sweep, leaning=False)
    assert summary["best_single"]["subset"] == "clip_tiny" and summary["best_single"]["test/acc"] == 0.50
    assert summary["best_single"]["n"] == 1 and summary["best_single"]["std"] is None
    assert summary["best_fused"]["subset"] == "clip_tiny+dino_tiny+vit_tiny"
    assert summary["best_fused"]["test/acc"] == 0.66
    assert summary["fused_gain"] == pytest.approx(0.16) and summary["all_gain"] == pytest.approx(0.16)
    assert summary["fused_gain_std"] is None and summary["fused_gain_positive"] == "1 of 1 seeds"
    assert summary["seed_std_pooled"] is None
    rows = list(csv.DictReader((sweep / "subsets.csv").open()))
    assert [r["subset"] for r in rows] == NAMES
    assert {r["n"] for r in rows} == {"1"} and {r["test/acc:std"] for r in rows} == {""}
    assert (sweep / "subsets.png").stat().st_size > 0
    md = (sweep / "subsets.md").read_text().splitlines()
    assert md[0].startswith("| subset | n | test/acc (mean ± std) |") and len(md) == 2 + 7
    assert md[2] == "| clip_tiny | 1 | 0.500 | 0.500..0.500 | 0.250 | 0.490 |"
    assert json.loads((sweep / "summary.json").read_text()) == summary
    assert len(list(csv.DictReader((sweep / "jobs.csv").open()))) == 7


def test_three_seeds_give_means_stds_and_gains_paired_by_seed(tmp_path):
    sweep = _seeded_sweep(tmp_path)
    rows = collect(sweep)
    assert len(rows) == 21
    assert [(r["subset"], r["seed"], r["job"]) for r in rows[:3]] == [("clip_tiny", s, str(7 * s)) for s in range(3)]

    table = aggregate(rows)
    assert [r["subset"] for r in table] == NAMES
    clip, dino, vit = table[:3]
    assert clip["n"] == 3 and clip["seeds"] == "0,1,2"
    assert clip["test/acc"] == pytest.approx(0.60) and clip["test/acc:std"] == pytest.approx(0.10)
    assert (clip["test/acc:min"], clip["test/acc:max"]) == (0.50, 0.70)
    assert clip["test/acc_color"] == pytest.approx(0.30) and clip["test/acc_color:std"] == pytest.approx(0.05)
    assert clip["val/acc"] == pytest.approx(0.59)
    assert dino["test/acc:std"] == pytest.approx(0.0)
    assert vit["test/acc"] == pytest.approx(0.57) and vit["test/acc:std"] == pytest.approx(0.05)

    summary = write_study(sweep, leaning=False)
    assert summary["seeds"] == [0, 1, 2]
    best = summary["best_single"]
    assert best["subset"] == "clip_tiny" and best["n"] == 3
    assert best["test/acc"] == pytest.approx(0.60) and best["std"] == pytest.approx(0.10)
    assert best["per_seed"] == {"0": 0.50, "1": 0.60, "2": 0.70}
    assert summary["best_fused"]["subset"] == "clip_tiny+vit_tiny"
    assert summary["best_fused"]["test/acc"] == pytest.approx(0.66)
    assert summary["best_fused"]["std"] == pytest.approx(math.sqrt((0.08**2 + 0.02**2 + 0.10**2) / 2))
    assert summary["all"]["subset"] == "clip_tiny+dino_tiny+vit_tiny"
    assert summary["all"]["test/acc"] == pytest.approx(0.63)
    # Paired by seed: fused(seed s) - clip(seed s).
    assert summary["fused_gain_per_seed"] == pytest.approx({"0": 0.08, "1": 0.04, "2": 0.06})
    assert summary["fused_gain"] == pytest.approx(0.06) and summary["fused_gain_std"] == pytest.approx(0.02)
    assert (summary["fused_gain_min"], summary["fused_gain_max"]) == pytest.approx((0.04, 0.08))
    assert summary["fused_gain_positive"] == "3 of 3 seeds"
    assert summary["all_gain_per_seed"] == pytest.approx({"0": 0.05, "1": 0.01, "2": 0.03})
    assert summary["all_gain"] == pytest.approx(0.03) and summary["all_gain_std"] == pytest.approx(0.02)
    # Pooled over subsets (2 degrees of freedom each): variances 0.01, 0, 0.0025, 0, 0.0084, 0, 0.0084.
    assert summary["seed_std_pooled"] == pytest.approx(math.sqrt((0.01 + 0.0025 + 0.0084 + 0.0084) / 7))

    md = (sweep / "subsets.md").read_text().splitlines()
    assert md[2] == "| clip_tiny | 3 | 0.600 ± 0.100 | 0.500..0.700 | 0.300 | 0.590 |"
    assert md[3].startswith("| dino_tiny | 3 | 0.400 ± 0.000 | 0.400..0.400 |")
    csv_rows = list(csv.DictReader((sweep / "subsets.csv").open()))
    assert len(csv_rows) == 7 and float(csv_rows[0]["test/acc:std"]) == pytest.approx(0.10)
    jobs = list(csv.DictReader((sweep / "jobs.csv").open()))
    assert len(jobs) == 21 and [j["seed"] for j in jobs[:3]] == ["0", "1", "2"]
    assert (sweep / "subsets.png").stat().st_size > 0


def test_a_stopped_sweep_pairs_only_the_seeds_both_ran(tmp_path):
    sweep = _seeded_sweep(tmp_path, drop={("clip_tiny+vit_tiny", 2), ("clip_tiny+dino_tiny+vit_tiny", 2)})
    summary = write_study(sweep, leaning=False)
    assert summary["best_fused"]["subset"] == "clip_tiny+vit_tiny" and summary["best_fused"]["n"] == 2
    assert summary["best_fused"]["test/acc"] == pytest.approx(0.61)
    assert summary["fused_gain_per_seed"] == pytest.approx({"0": 0.08, "1": 0.04})
    assert summary["fused_gain"] == pytest.approx(0.06) and summary["fused_gain_positive"] == "2 of 2 seeds"
    rows = {r["subset"]: r for r in csv.DictReader((sweep / "subsets.csv").open())}
    assert rows["clip_tiny+vit_tiny"]["n"] == "2" and rows["clip_tiny+vit_tiny"]["seeds"] == "0,1"


def test_missing_metric_and_empty_sweep_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    rows = collect(_sweep(tmp_path / "a", [0.5] * 7))
    with pytest.raises(ValueError, match="'test/f1'"):
        summarize(rows, "test/f1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_study(tmp_path / "empty", leaning=False)


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
