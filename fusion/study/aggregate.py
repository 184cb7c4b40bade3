"""The subset table of one group of jobs (one task): every metric over seeds, best single vs best fused vs all.

- :func:`aggregate`: one row per encoder subset, every metric's mean over the jobs (seeds), ``n``, the
  seeds, its sample standard deviation (``ddof=1``; empty for one job), and for the study metric min and max
  (per answer type or label too: the task's metrics.json carries ``test/acc_<type>``);
- :func:`summarize`: best single encoder vs best fused subset vs all encoders (subsets picked by their
  mean), each with mean, std, min, max, n and the value per seed, and the gains of best-fused and all over
  the best single **paired by seed** (the fused subset's seed-s run minus the best single's seed-s run),
  with their mean, std, min, max and how many seeds gained, beside the pooled seed noise of one subset;
- :func:`write_table`: ``subsets.csv``, ``subsets.md`` and ``subsets.png`` (the metric's mean per subset as
  a diamond, min..max over seeds, one dot per seed, the best single encoder's mean as a line).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from fusion.io import save_figure, write_text  # noqa: E402
from fusion.study.common import MAX, MIN, STD, seed_key, seed_name, spread, write_csv  # noqa: E402
from fusion.study.common import is_number as _is_number  # noqa: E402
from fusion.study.jobs import KEYS  # noqa: E402

__all__ = ["aggregate", "spread", "summarize", "write_table"]


def aggregate(rows: list[dict[str, Any]], metric: str = "test/acc") -> list[dict[str, Any]]:
    """One row per subset: every numeric metric's mean over its jobs, ``n``, ``seeds`` and the spread columns.

    Every metric gets ``<metric>:std``; ``metric`` (the study's) also ``:min`` and ``:max``.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["subset"], []).append(r)
    out = []
    for subset, jobs in groups.items():
        row: dict[str, Any] = {
            "subset": subset, "size": jobs[0]["size"], "n": len(jobs),
            "seeds": ",".join(str(s) for s in sorted({j["seed"] for j in jobs}, key=seed_key)),
        }
        names = sorted({k for j in jobs for k, v in j.items() if k not in KEYS and _is_number(v)})
        for name in names:
            stats = spread([j[name] for j in jobs if _is_number(j.get(name))])
            row[name], row[name + STD] = stats["mean"], stats["std"]
            if name == metric:
                row[name + MIN], row[name + MAX] = stats["min"], stats["max"]
        out.append(row)
    return sorted(out, key=lambda r: (r["size"], r["subset"]))


def summarize(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Best single encoder vs the best fused subset and all encoders on ``metric``, over seeds.

    ``rows`` are :func:`collect`'s (one per job). Subsets are ranked by their mean. ``<best_fused|all>_gain``
    is the mean of the per-seed differences to the best single encoder over the seeds both ran (equal to the
    difference of the means when both ran the same seeds); ``..._gain_per_seed`` lists them.
    """
    scored = [r for r in rows if _is_number(r.get(metric))]
    if not scored:
        raise ValueError(f"study: no job reports {metric!r}; reported: {sorted({k for r in rows for k in r})}")
    per_subset: dict[str, dict[str, Any]] = {}
    for r in scored:
        entry = per_subset.setdefault(r["subset"], {"subset": r["subset"], "size": r["size"], "by_seed": {}})
        entry["by_seed"].setdefault(r["seed"], []).append(r[metric])

    def describe(entry: dict[str, Any] | None) -> dict[str, Any] | None:
        if entry is None:
            return None
        stats = spread([v for vs in entry["by_seed"].values() for v in vs])
        by_seed = sorted(entry["by_seed"].items(), key=lambda item: seed_key(item[0]))
        return {
            "subset": entry["subset"], metric: stats["mean"], "std": stats["std"], "min": stats["min"],
            "max": stats["max"], "n": stats["n"],
            "per_seed": {seed_name(s): statistics.fmean(vs) for s, vs in by_seed},
        }

    def mean_of(entry: dict[str, Any]) -> float:
        return statistics.fmean([v for vs in entry["by_seed"].values() for v in vs])

    best = lambda es: max(es, key=mean_of) if es else None  # noqa: E731
    singles = [e for e in per_subset.values() if e["size"] == 1]
    fused = [e for e in per_subset.values() if e["size"] > 1]
    full = max(per_subset.values(), key=lambda e: (e["size"], mean_of(e)))
    seeds = sorted({r["seed"] for r in scored}, key=seed_key)
    out: dict[str, Any] = {
        "metric": metric,
        "seeds": seeds,
        "error_bars": "std: sample standard deviation over seeds (ddof=1, null for one seed); plot: min..max",
        "best_single": describe(best(singles)),
        "best_fused": describe(best(fused)),
        "all": describe(full),
    }
    # Seed noise of one subset: the pooled sample std over every subset with two or more seeds.
    variances = [(len(vs) - 1, spread(vs)["std"] ** 2) for e in per_subset.values()
                 if len(vs := [v for x in e["by_seed"].values() for v in x]) > 1]
    dof = sum(d for d, _ in variances)
    out["seed_std_pooled"] = math.sqrt(sum(d * v for d, v in variances) / dof) if dof else None
    if out["best_single"] and out["best_fused"]:
        single = best(singles)["by_seed"]
        for key, entry in (("fused", best(fused)), ("all", full)):
            shared = [s for s in seeds if s in single and s in entry["by_seed"]]
            gains = {seed_name(s): statistics.fmean(entry["by_seed"][s]) - statistics.fmean(single[s]) for s in shared}
            stats = spread(list(gains.values())) if gains else None
            out[f"{key}_gain"] = stats["mean"] if stats else None
            out[f"{key}_gain_per_seed"] = gains
            out[f"{key}_gain_std"] = stats["std"] if stats else None
            out[f"{key}_gain_min"] = stats["min"] if stats else None
            out[f"{key}_gain_max"] = stats["max"] if stats else None
            out[f"{key}_gain_positive"] = f"{sum(g > 0 for g in gains.values())} of {len(gains)} seeds"
    return out


def write_table(folder: Path, rows: list[dict[str, Any]], metric: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One group's ``jobs.csv``, ``subsets.csv``, ``subsets.md`` and ``subsets.png`` in ``folder``; returns
    :func:`aggregate`'s table."""
    write_csv(folder / "jobs.csv", rows, list(KEYS))
    table = aggregate(rows, metric)
    write_csv(folder / "subsets.csv", table, ["subset", "size", "n", "seeds"])
    write_text(folder / "subsets.md", _markdown(table, metric))
    _plot(rows, table, metric, summary, folder / "subsets.png")
    return table


def _markdown(table: list[dict[str, Any]], metric: str) -> str:
    """The metric as mean ± std, its min..max, then the other metrics of its stage as means."""
    stage, _, name = metric.partition("/")
    others = sorted({k for r in table for k in r if k.startswith(f"{stage}/{name}_") and ":" not in k})
    val = [f"val/{name}"] if any(f"val/{name}" in r for r in table) and stage != "val" else []
    header = ["subset", "n", f"{metric} (mean ± std)", "min..max", *(k + " (mean)" for k in others + val)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table:
        std = r.get(metric + STD)
        head = f"{_cell(r.get(metric))} ± {_cell(std)}" if std is not None else _cell(r.get(metric))
        span = f"{_cell(r.get(metric + MIN))}..{_cell(r.get(metric + MAX))}" if metric in r else ""
        lines.append("| " + " | ".join([r["subset"], str(r["n"]), head, span, *(_cell(r.get(k)) for k in others + val)])
                     + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "")


def _plot(rows: list[dict[str, Any]], table: list[dict[str, Any]], metric: str, summary: dict[str, Any],
          path: Path) -> None:
    table = [r for r in table if metric in r]
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:green"}
    fig, ax = plt.subplots(figsize=(1.2 * len(table) + 2, 4))
    x = range(len(table))
    means = [r[metric] for r in table]
    # max(0, .): a mean of equal values can round a hair past them.
    low = [max(0.0, r[metric] - r[metric + MIN]) for r in table]
    high = [max(0.0, r[metric + MAX] - r[metric]) for r in table]
    # Means as big markers (not bars from 0, which would hide differences of a point on a 0.8 accuracy).
    ax.errorbar(x, means, yerr=[low, high], fmt="none", ecolor="black", capsize=4, label="min..max over seeds")
    ax.scatter(x, means, s=80, marker="D", zorder=3, color=[colors.get(r["size"], "tab:purple") for r in table],
               label="mean over seeds")
    for i, r in enumerate(table):
        values = [j[metric] for j in rows if j["subset"] == r["subset"] and _is_number(j.get(metric))]
        ax.scatter([i] * len(values), values, s=12, color="black", zorder=4)
    ax.set_xticks(list(x), [f"{r['subset'].replace('+', chr(10) + '+')}\nn={r['n']}" for r in table], fontsize=8)
    ax.set_xlim(-0.6, len(table) - 0.4)
    if summary["best_single"]:
        ax.axhline(summary["best_single"][metric], color="black", linestyle="--", label="best single encoder (mean)")
    # run.train writes the majority-answer baseline as <stage>/majority_<metric name>.
    stage, _, name = metric.partition("/")
    majority = next((r[f"{stage}/majority_{name}"] for r in rows if f"{stage}/majority_{name}" in r), None)
    if majority is not None:
        bottom, top = ax.get_ylim()
        if bottom <= majority <= top:
            ax.axhline(majority, color="tab:red", linestyle=":", label="majority answer")
        else:  # far below the subsets: named, not drawn, so the axis stays zoomed on them
            ax.plot([], [], " ", label=f"majority answer {majority:.3f} (off axis)")
    ax.legend(loc="best", fontsize=7)
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.set_title("encoder subsets (gray: one, blue: two, green: three); small dots: one seed each")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


