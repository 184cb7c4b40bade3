"""Retrain vs mask: does masking encoders of the all-encoder model rank the subsets as retraining them does?

For one group (task, VE-dropout, fusion, head), each subset ``S`` has two scores per seed ``s``:

- *retrained*: the study metric of the job trained on ``S`` with seed ``s``;
- *masked*: the same metric (on the same split) of the all-encoder job of seed ``s`` evaluated with only
  ``S`` visible (``eval.py mode=encoder_ablation`` on its best checkpoint: VE-dropout at inference).

Per seed, over the subsets that have both, the two rankings are compared with Kendall's tau (tau-b, ties
handled by scipy) and Spearman's rho (:func:`scipy.stats.kendalltau`, :func:`scipy.stats.spearmanr`); a
constant ranking (or fewer than two subsets) leaves them undefined (None, never 0). *Pooled*: the same
statistics between the subsets' mean retrained and mean masked scores over the seeds both have. *Top-1*:
the best subsets (every subset tied at the top) of each ranking; they agree when the two sets share a subset.
``difference`` per subset and seed: masked minus retrained (the all-encoder subset's is 0 up to the
evaluation's own noise: the same checkpoint scored twice).
"""

from __future__ import annotations

import math
import statistics
import warnings
from typing import Any

from scipy import stats

from fusion.study.common import finite, seed_key, seed_name, spread
from fusion.study.jobs import subset_key

__all__ = ["agreement", "masked_scores", "rank_agreement", "retrained_scores"]


def retrained_scores(rows: list[dict[str, Any]], metric: str) -> dict[frozenset[str], dict[Any, float]]:
    """{subset: {seed: metric}} of one group's jobs (jobs of one subset and seed averaged)."""
    values: dict[frozenset[str], dict[Any, list[float]]] = {}
    for r in rows:
        if finite(r.get(metric)):
            values.setdefault(subset_key(r["subset"]), {}).setdefault(r["seed"], []).append(r[metric])
    return {s: {seed: statistics.fmean(v) for seed, v in by_seed.items()} for s, by_seed in values.items()}


def masked_scores(analysed: list[dict[str, Any]], metric: str) -> dict[frozenset[str], dict[Any, float]]:
    """{subset: {seed: metric}} from the all-encoder jobs' ``encoder_ablation`` results.

    ``metric`` is the study's (``test/acc``); the ablation names it without its stage (``acc``). The
    ``none (mean tokens)`` row is no trainable subset and is left out.
    """
    from fusion.analysis.encoder_ablation import NONE  # lazily: the study's tables need no torch

    name = metric.partition("/")[2] or metric
    values: dict[frozenset[str], dict[Any, list[float]]] = {}
    for job in analysed:
        for subset, scores in job["encoder_ablation"]["subsets"].items():
            if subset != NONE and finite(scores.get(name)):
                values.setdefault(subset_key(subset), {}).setdefault(job["seed"], []).append(scores[name])
    return {s: {seed: statistics.fmean(v) for seed, v in by_seed.items()} for s, by_seed in values.items()}


def _defined(value: float) -> float | None:
    """NaN (scipy's answer for a constant ranking) as None: undefined, not 0."""
    return None if value is None or not math.isfinite(value) else float(value)


def _top(scores: dict[str, float]) -> list[str]:
    best = max(scores.values())
    return sorted(s for s, v in scores.items() if v == best)


def rank_agreement(retrained: dict[str, float], masked: dict[str, float]) -> dict[str, Any]:
    """Kendall's tau, Spearman's rho and top-1 agreement of two scorings of the same subsets (names as keys;
    only the subsets in both count)."""
    common = sorted(set(retrained) & set(masked))
    out: dict[str, Any] = {"subsets": common, "n": len(common), "kendall_tau": None, "kendall_p": None,
                           "spearman_rho": None, "spearman_p": None, "top1_retrained": [], "top1_masked": [],
                           "top1_agree": None}
    if not common:
        return out
    a, b = [retrained[s] for s in common], [masked[s] for s in common]
    if len(common) > 1:
        with warnings.catch_warnings():  # a constant ranking: NaN, reported as undefined below
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            tau = stats.kendalltau(a, b)
            rho = stats.spearmanr(a, b)
        out.update(kendall_tau=_defined(tau.statistic), kendall_p=_defined(tau.pvalue),
                   spearman_rho=_defined(rho.statistic), spearman_p=_defined(rho.pvalue))
    top_r, top_m = _top(dict(zip(common, a, strict=True))), _top(dict(zip(common, b, strict=True)))
    out.update(top1_retrained=top_r, top1_masked=top_m, top1_agree=bool(set(top_r) & set(top_m)))
    return out


def agreement(rows: list[dict[str, Any]], analysed: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """One group's retrain-vs-mask agreement: per seed, pooled, and the per-subset differences.

    ``rows``: the group's jobs (:func:`fusion.study.jobs.collect`); ``analysed``: its all-encoder jobs'
    analyses (:func:`fusion.study.leaning.analyse_full_jobs`). ``{"skipped": why}`` without the latter.
    """
    if not analysed:
        return {"skipped": "no all-encoder job with more than one encoder to mask"}
    retrained, masked = retrained_scores(rows, metric), masked_scores(analysed, metric)
    names = {s: "+".join(sorted(s)) for s in {*retrained, *masked}}
    seeds = sorted({seed for by_seed in masked.values() for seed in by_seed}, key=seed_key)
    per_seed = {}
    for seed in seeds:
        r = {names[s]: v[seed] for s, v in retrained.items() if seed in v}
        m = {names[s]: v[seed] for s, v in masked.items() if seed in v}
        per_seed[seed_name(seed)] = rank_agreement(r, m)
    # Pooled: the subsets' means over the seeds both scorings have.
    mean_r, mean_m, points, differences = {}, {}, [], {}
    for s in sorted(set(retrained) & set(masked), key=lambda s: (len(s), names[s])):
        shared = [seed for seed in seeds if seed in retrained[s] and seed in masked[s]]
        if not shared:
            continue
        mean_r[names[s]] = statistics.fmean(retrained[s][x] for x in shared)
        mean_m[names[s]] = statistics.fmean(masked[s][x] for x in shared)
        diffs = {seed_name(x): masked[s][x] - retrained[s][x] for x in shared}
        differences[names[s]] = {**spread(list(diffs.values())), "per_seed": diffs}
        points += [{"subset": names[s], "size": len(s), "seed": x, "retrained": retrained[s][x],
                    "masked": masked[s][x]} for x in shared]
    return {
        "metric": metric,
        "seeds": seeds,
        "per_seed": per_seed,
        "pooled": rank_agreement(mean_r, mean_m),
        "difference": differences,
        "points": points,
        "not_retrained": sorted(names[s] for s in set(masked) - set(retrained)),
    }
