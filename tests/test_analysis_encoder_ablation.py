"""eval.py mode=encoder_ablation on a tiny trained checkpoint: every subset, the baselines, the contributions."""

import csv
import math

import pytest
from analysis_helpers import ENCODERS, check_wandb, run_mode, tiny_checkpoint

from fusion.analysis.encoder_ablation import NONE, marginal_contributions, masking_changes


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    ckpt, workdir = tiny_checkpoint(tmp_path_factory)
    # With a wandb logger too: the tables and figures go there as well (offline run in the run folder).
    results = run_mode("encoder_ablation", ckpt, workdir, "logger=wandb")
    return results, workdir / "eval_encoder_ablation" / "encoder_ablation"


def test_every_subset_is_evaluated_on_the_whole_split(ablation):
    results, _ = ablation
    assert set(results["subsets"]) == {"clip_tiny", "dino_tiny", "clip_tiny+dino_tiny", NONE}
    for values in results["subsets"].values():
        assert values["n"] == 100 * 3  # every question of the 100 validation images
        assert 0.0 <= values["acc"] <= 1.0 and values["loss"] > 0


def test_ablating_every_encoder_moves_the_metric_towards_the_text_only_baseline(ablation):
    results, _ = ablation
    prior = results["baselines"]["question_prior"]
    full = results["subsets"]["+".join(ENCODERS)]["acc"]
    none = results["subsets"][NONE]["acc"]
    assert full > prior + 0.05, "the tiny checkpoint should beat the image-blind baseline"
    assert abs(none - prior) < abs(full - prior)
    assert none < full and results["subsets"][NONE]["loss"] > results["subsets"]["+".join(ENCODERS)]["loss"]


def test_marginal_contributions_follow_from_the_subset_scores(ablation):
    results, _ = ablation
    acc = {k: v["acc"] for k, v in results["subsets"].items()}
    full, none = acc["clip_tiny+dino_tiny"], acc[NONE]
    marginal = results["marginal"]
    assert marginal["clip_tiny"]["drop_when_removed"] == pytest.approx(full - acc["dino_tiny"])
    assert marginal["dino_tiny"]["mean_gain_when_added"] == pytest.approx(
        ((acc["dino_tiny"] - none) + (full - acc["clip_tiny"])) / 2
    )
    assert sum(m["shapley"] for m in marginal.values()) == pytest.approx(full - none)


def test_report_folder_has_table_plots_and_markdown(ablation):
    _, folder = ablation
    with open(folder / "subsets.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["subset"] for r in rows][-1] == NONE and len(rows) == 4
    for png in ("subsets.png", "marginal.png"):
        assert (folder / png).stat().st_size > 10_000
        assert f"]({png})" in (folder / "report.md").read_text()
    assert (folder / "marginal.csv").is_file() and (folder / "results.json").is_file()


def test_tables_and_figures_are_in_wandb(ablation):
    _, folder = ablation
    summary = check_wandb(folder.parent, "encoder_ablation")
    assert summary["analysis/encoder_ablation/table/subsets"]["nrows"] == 4


def test_shapley_of_an_additive_score_is_each_encoders_weight():
    weights = {"a": 0.1, "b": 0.2, "c": 0.4}
    names = list(weights)
    score = {}
    for code in range(8):
        subset = frozenset(n for i, n in enumerate(names) if code >> i & 1)
        score[subset] = 0.05 + sum(weights[n] for n in subset)
    out = marginal_contributions(names, score)
    for n, w in weights.items():
        assert math.isclose(out[n]["shapley"], w) and math.isclose(out[n]["drop_when_removed"], w)
        assert math.isclose(out[n]["mean_gain_when_added"], w)


def test_masking_changes_count_changed_helped_and_hurt_answers_by_hand():
    # Labels q1: 0, q2: 2, q3: 1; q4 is not scored. Masking a (answers of "b"): q2 1 -> 2 (helped), q4 0 -> 1
    # (changed, unscored): changed 2/4, helped 1/3. Masking b (answers of "a"): q1 0 -> 1 (hurt), q3 2 -> 1
    # (helped): changed 2/4, helped 1/3, hurt 1/3.
    answers = {"a+b": {"q1": 0, "q2": 1, "q3": 2, "q4": 0}, "b": {"q1": 0, "q2": 2, "q3": 2, "q4": 1},
               "a": {"q1": 1, "q2": 1, "q3": 1, "q4": 0}}
    labels = {"q1": 0, "q2": 2, "q3": 1}
    out = masking_changes(["a", "b"], answers, lambda q, a: float(a == labels[q]) if q in labels else None)
    assert out["a"] == {"changed": 0.5, "helped": 1 / 3, "hurt": 0.0, "n": 4, "n_scored": 3, "helped_ids": ["q2"]}
    assert out["b"] == {"changed": 0.5, "helped": 1 / 3, "hurt": 1 / 3, "n": 4, "n_scored": 3, "helped_ids": ["q3"]}


def test_masking_shares_are_in_the_results_and_masking_csv(ablation):
    results, folder = ablation
    for e in ("clip_tiny", "dino_tiny"):
        m = results["masking"][e]
        assert m["n"] == 300 and 0.0 <= m["helped"] + m["hurt"] <= m["changed"] <= 1.0
    rows = list(csv.DictReader((folder / "masking.csv").open()))
    assert [r["encoder"] for r in rows] == ["clip_tiny", "dino_tiny"]
