"""fusion.study.aggregate (and jobs.collect): a sweep folder's jobs (subsets x seeds) -> table, plot and summary."""

import csv
import itertools
import json
import math

import pytest
import yaml

from fusion.study import write_study
from fusion.study.aggregate import aggregate, spread, summarize
from fusion.study.jobs import collect

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
