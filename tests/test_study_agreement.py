"""fusion.study.agreement: retrained vs masked rankings of the subsets, on hand-made scores (values by hand)."""

import math

import pytest

from fusion.study.agreement import agreement, rank_agreement


def test_identical_and_reversed_rankings_give_plus_and_minus_one():
    same = rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 2, "c": 3})
    assert (same["kendall_tau"], same["spearman_rho"]) == pytest.approx((1.0, 1.0))
    assert same["top1_retrained"] == same["top1_masked"] == ["c"] and same["top1_agree"] is True
    reverse = rank_agreement({"a": 1, "b": 2, "c": 3}, {"a": 3, "b": 2, "c": 1})
    assert (reverse["kendall_tau"], reverse["spearman_rho"]) == pytest.approx((-1.0, -1.0))
    assert reverse["top1_masked"] == ["a"] and reverse["top1_agree"] is False


def test_ties_are_tau_b_and_average_ranks():
    # Retrained a = b: the (a, b) pair counts for neither; (a, c), (b, c) concordant: tau-b = 2 / sqrt(2 * 3).
    # Average ranks x = (1.5, 1.5, 3), y = (2, 1, 3): rho = 1.5 / sqrt(1.5 * 2).
    r = rank_agreement({"a": 0.5, "b": 0.5, "c": 0.7}, {"a": 0.6, "b": 0.4, "c": 0.8})
    assert r["kendall_tau"] == pytest.approx(2 / math.sqrt(6))
    assert r["spearman_rho"] == pytest.approx(1.5 / math.sqrt(3))
    # Tied best subsets: top-1 agrees when the two sets of best subsets share one.
    top = rank_agreement({"a": 0.7, "b": 0.7, "c": 0.1}, {"a": 0.2, "b": 0.9, "c": 0.1})
    assert top["top1_retrained"] == ["a", "b"] and top["top1_masked"] == ["b"] and top["top1_agree"] is True


def test_a_constant_ranking_or_one_subset_is_undefined_not_zero():
    flat = rank_agreement({"a": 0.5, "b": 0.5}, {"a": 0.1, "b": 0.2})
    assert flat["kendall_tau"] is None and flat["spearman_rho"] is None and flat["n"] == 2
    one = rank_agreement({"a": 0.5, "b": 0.4}, {"a": 0.1})
    assert one["n"] == 1 and one["kendall_tau"] is None and one["top1_agree"] is True
    assert rank_agreement({}, {"a": 0.1})["top1_agree"] is None


RETRAINED = {("a", 0): 0.5, ("b", 0): 0.6, ("a+b", 0): 0.7, ("a", 1): 0.6, ("b", 1): 0.5, ("a+b", 1): 0.8}
MASKED = {0: {"a": 0.4, "b": 0.55, "a+b": 0.7}, 1: {"a": 0.3, "b": 0.45, "a+b": 0.8}}


def rows():
    return [{"subset": s, "seed": seed, "job": f"{s}-{seed}", "test/acc": v} for (s, seed), v in RETRAINED.items()]


def analysed(masking=None):
    return [{"job": f"a+b-{seed}", "seed": seed, "encoder_ablation": {
        "metric": "acc", "subsets": {**{k: {"acc": v} for k, v in m.items()}, "none (mean tokens)": {"acc": 0.2}},
        "masking": (masking or {}).get(seed, {})}} for seed, m in MASKED.items()]


def test_agreement_per_seed_pooled_and_differences():
    a = agreement(rows(), analysed(), "test/acc")
    assert a["seeds"] == [0, 1]
    # Seed 0: both a < b < a+b. Seed 1: retrained b < a < a+b, masked a < b < a+b: one discordant pair of 3
    # (tau 1/3); rank differences 1, 1, 0: rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    assert a["per_seed"]["0"]["kendall_tau"] == pytest.approx(1.0)
    assert a["per_seed"]["1"]["kendall_tau"] == pytest.approx(1 / 3)
    assert a["per_seed"]["1"]["spearman_rho"] == pytest.approx(0.5)
    # Pooled: means retrained a = b = 0.55, a+b = 0.75; masked 0.35, 0.5, 0.75: the tie case above.
    assert a["pooled"]["kendall_tau"] == pytest.approx(2 / math.sqrt(6))
    assert a["pooled"]["spearman_rho"] == pytest.approx(1.5 / math.sqrt(3))
    assert a["pooled"]["top1_retrained"] == ["a+b"] and a["pooled"]["top1_agree"] is True
    assert a["difference"]["a"]["per_seed"] == pytest.approx({"0": -0.1, "1": -0.3})
    assert a["difference"]["a"]["mean"] == pytest.approx(-0.2)
    assert a["difference"]["a+b"]["mean"] == pytest.approx(0.0)
    assert a["not_retrained"] == [] and len(a["points"]) == 6
    assert agreement(rows(), [], "test/acc") == {"skipped": "no all-encoder job with more than one encoder to mask"}
