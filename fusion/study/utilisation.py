"""How much each encoder is used: Capacity and Necessity, retrained and masked, answer changes, effective rank.

Per encoder ``e`` of one group (``A`` all encoders, means over seeds; differences paired by seed):

- ``capacity_retrained``: the metric of the job trained on ``e`` alone; ``capacity_masked``: the
  all-encoder job evaluated with only ``e`` visible;
- ``necessity_retrained``: ``f(A) - f(A - {e})`` of the retrained jobs; ``necessity_masked``: the same of
  the masked all-encoder job (VE-dropout's ``drop_when_removed``). Capacity and Necessity as in "Beyond
  Encoder Accumulation: Measuring Encoder Roles in Multi-Encoder VLMs" (2026);
- ``changed`` / ``helped`` / ``hurt``: the share of examples whose answer changes, whose score rises
  (masking helps: redundancy) or falls when ``e`` alone is masked (``encoder_ablation``'s ``masking``);
- ``erank_features`` / ``erank_projected``: the effective rank (:func:`effective_rank`) of the encoder's
  tokens before the fuser and after its per-encoder projection, on the first ``max_examples`` examples of
  the evaluated split, per job (:func:`job_effective_ranks`).

The Conditional Utilization Rate and Information Gap of arXiv 2507.03262 are not computed: their formulas
could not be confirmed from the paper's text (see docs/study.md).
"""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path
from typing import Any

from fusion.study.agreement import masked_scores, retrained_scores
from fusion.study.common import seed_name, spread
from fusion.study.jobs import analysis_config, best_checkpoint, sweep_cwd

__all__ = ["effective_rank", "job_effective_ranks", "utilisation"]


def effective_rank(matrix: Any, centre: bool = True) -> float:
    """Roy & Vetterli (2007): ``exp(H(p))`` with ``p_k = s_k / sum(s)`` over the singular values ``s`` of
    ``matrix`` (rows: tokens, columns: width); between 1 and the rank. ``centre``: subtract the mean row
    first, so that an offset shared by every token does not count as a direction."""
    import torch

    x = torch.as_tensor(matrix, dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"effective_rank needs a non-empty (tokens, width) matrix, got shape {tuple(x.shape)}")
    if centre:
        x = x - x.mean(0, keepdim=True)
    s = torch.linalg.svdvals(x)
    s = s[s > s.max() * 1e-12] if s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0  # every token equal (after centring): no direction at all
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def job_effective_ranks(job: str | Path, stage: str = "test", max_examples: int = 256) -> dict[str, Any]:
    """Effective rank of each encoder's tokens on the first batches (at least ``max_examples`` examples) of the job's
    ``task.<stage>_split``, from its best checkpoint: ``features`` (the encoder's output, pre-projector) and
    ``projected`` (the fuser's per-encoder projection ``fuser.proj[<encoder>]``; None for fusers without one,
    such as channel_concat, whose single projection mixes the encoders). Tokens of all examples (and
    images) are stacked into one (tokens, width) matrix per encoder, centred."""
    import torch

    from fusion.analysis.common import open_analysis  # lazily: torch and the models

    job = Path(job).resolve()
    ckpt, _ = best_checkpoint(job)
    cfg = analysis_config(job, "effective_rank", stage, ckpt, job / "leaning")
    features: dict[str, list[torch.Tensor]] = {}
    projected: dict[str, list[torch.Tensor]] = {}
    with contextlib.chdir(sweep_cwd(job)), open_analysis(cfg, "effective_rank") as ctx:
        proj = getattr(ctx.model.fusion.fuser, "proj", None)
        hooks = []
        if isinstance(proj, torch.nn.ModuleDict):
            for name in ctx.encoder_names:
                if name in proj:
                    hooks.append(proj[name].register_forward_hook(
                        lambda m, i, o, name=name: projected.setdefault(name, []).append(o.reshape(-1, o.shape[-1]))))
        seen = 0
        try:
            for batch in ctx.batches():
                for name, f in ctx.model.encode_images(batch).items():
                    features.setdefault(name, []).append(f.reshape(-1, f.shape[-1]))
                ctx.model(batch)  # the hooks keep the projected tokens
                # Whole batches (no slicing of the batch's many fields): at most one batch past the bound.
                seen += batch["input_ids"].shape[0]
                if seen >= max_examples:
                    break
        finally:
            for hook in hooks:
                hook.remove()
    return {
        "examples": seen,
        "features": {n: effective_rank(torch.cat(v)) for n, v in features.items()},
        "projected": {n: effective_rank(torch.cat(projected[n])) if n in projected else None for n in features},
        "width": {n: int(v[0].shape[-1]) for n, v in features.items()},
    }


def _mean_over_seeds(by_seed: dict[Any, float] | None) -> dict[str, Any] | None:
    if not by_seed:
        return None
    return {**spread(list(by_seed.values())), "per_seed": {seed_name(s): v for s, v in by_seed.items()}}


def _paired_drop(scores: dict[frozenset[str], dict[Any, float]], full: frozenset[str], e: str) -> dict[Any, float]:
    """{seed: f(A) - f(A - {e})} over the seeds both were scored on."""
    a, without = scores.get(full, {}), scores.get(full - {e}, {})
    return {s: a[s] - without[s] for s in a if s in without}


def utilisation(rows: list[dict[str, Any]], analysed: list[dict[str, Any]], metric: str,
                ranks: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One group's measures per encoder (see the module): each a :func:`~fusion.study.common.spread` over
    seeds with ``per_seed``, or None where the sweep lacks the jobs. ``ranks``: {job: :func:`job_effective_ranks`}."""
    retrained = retrained_scores(rows, metric)
    masked = masked_scores(analysed, metric) if analysed else {}
    full = max((*retrained, *masked), key=len)
    encoders = sorted(full)
    seed_of = {r["job"]: r["seed"] for r in rows}
    subset_of = {r["job"]: r["subset"] for r in rows}
    out: dict[str, Any] = {"metric": metric, "encoders": encoders, "all": "+".join(encoders), "by_encoder": {}}
    for e in encoders:
        entry: dict[str, Any] = {
            "capacity_retrained": _mean_over_seeds(retrained.get(frozenset({e}))),
            "capacity_masked": _mean_over_seeds(masked.get(frozenset({e}))),
            "necessity_retrained": _mean_over_seeds(_paired_drop(retrained, full, e)),
            "necessity_masked": _mean_over_seeds(_paired_drop(masked, full, e)),
        }
        for share in ("changed", "helped", "hurt"):
            entry[share] = _mean_over_seeds({
                j["seed"]: v for j in analysed
                if (v := j["encoder_ablation"].get("masking", {}).get(e, {}).get(share)) is not None})
        for kind in ("features", "projected"):
            # Per job; the all-encoder jobs' over seeds here, every job's in effective_rank.csv.
            by_seed: dict[Any, list[float]] = {}
            for job, r in (ranks or {}).items():
                if subset_key_of(subset_of.get(job)) == full and (v := r[kind].get(e)) is not None:
                    by_seed.setdefault(seed_of[job], []).append(v)
            entry[f"erank_{kind}"] = _mean_over_seeds({s: statistics.fmean(v) for s, v in by_seed.items()})
        out["by_encoder"][e] = entry
    return out


def subset_key_of(subset: str | None) -> frozenset[str]:
    return frozenset(subset.split("+")) if subset else frozenset()
