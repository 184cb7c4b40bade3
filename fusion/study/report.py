"""The paper-style report: study.md (subsets x tasks, agreement, utilisation, plots), the scatter, wandb.

``study.md`` holds one table whose rows are the encoder subsets and whose columns are the groups (tasks;
task + setting when the sweep varies VE-dropout, fusion or head), each cell the study metric's mean ± sample
std over seeds; then the retrain-vs-mask agreement of every group, its utilisation table, and links to
the plots. :func:`log_wandb` logs the same tables and images into one new offline wandb run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from fusion.io import save_figure  # noqa: E402
from fusion.study.common import STD, cell, mean_std  # noqa: E402

__all__ = ["agreement_rows", "log_wandb", "paper_rows", "scatter", "study_markdown", "utilisation_rows"]

UTILISATION = ("capacity_retrained", "capacity_masked", "necessity_retrained", "necessity_masked", "changed",
               "helped", "hurt", "erank_features", "erank_projected")


def paper_rows(tables: dict[str, list[dict[str, Any]]], metric: str) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the subsets x groups table: ``mean ± std`` (just the mean for one seed)."""
    groups = list(tables)
    order: dict[str, int] = {}
    for rows in tables.values():
        for r in rows:
            order.setdefault(r["subset"], r["size"])
    subsets = sorted(order, key=lambda s: (order[s], s))
    out = []
    for s in subsets:
        line = [s]
        for g in groups:
            r = next((r for r in tables[g] if r["subset"] == s), None)
            if r is None or metric not in r:
                line.append("")
            else:
                std = r.get(metric + STD)
                line.append(cell(r[metric]) + (f" ± {std:.3f}" if std is not None else "") + f" (n={r['n']})")
        out.append(line)
    return ["subset", *groups], out


def agreement_rows(agreements: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """One row per group and seed (and ``pooled``): tau, rho, subsets compared, top-1 of each, agreement."""
    columns = ["group", "seed", "n subsets", "kendall_tau", "spearman_rho", "top1 retrained", "top1 masked",
               "top1 agree"]
    rows = []
    for group, a in agreements.items():
        if "skipped" in a:
            rows.append([group, "", 0, None, None, "", "", a["skipped"]])
            continue
        for seed, r in [*a["per_seed"].items(), ("pooled (means)", a["pooled"])]:
            rows.append([group, seed, r["n"], r["kendall_tau"], r["spearman_rho"], ", ".join(r["top1_retrained"]),
                         ", ".join(r["top1_masked"]), r["top1_agree"]])
    return columns, rows


def utilisation_rows(util: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per encoder: each measure's mean over seeds."""
    rows = [[e, *((s["mean"] if (s := entry[m]) else None) for m in UTILISATION)]
            for e, entry in util["by_encoder"].items()]
    return ["encoder", *UTILISATION], rows


def _markdown(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("undefined" if v is None else cell(v) for v in r) + " |")
    return lines


def scatter(agreement: dict[str, Any], path: Path, title: str) -> None:
    """Retrained vs masked score, one point per subset and seed (colour: subset size), the diagonal y = x."""
    points = agreement["points"]
    fig, ax = plt.subplots(figsize=(5, 5))
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:green"}
    for p in points:
        ax.scatter(p["retrained"], p["masked"], color=colors.get(p["size"], "tab:purple"), s=20)
    labelled = {}
    for p in points:  # one label per subset, at its first point
        labelled.setdefault(p["subset"], (p["retrained"], p["masked"]))
    for subset, (x, y) in labelled.items():
        ax.annotate(subset, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    values = [v for p in points for v in (p["retrained"], p["masked"])] or [0.0, 1.0]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="black", linestyle=":", linewidth=1)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"{agreement['metric']} retrained on the subset")
    ax.set_ylabel(f"{agreement['metric']} of the all-encoder model, others masked")
    pooled = agreement["pooled"]
    ax.set_title(f"{title}: tau={cell(pooled['kendall_tau']) or 'undefined'}, "
                 f"rho={cell(pooled['spearman_rho']) or 'undefined'} (pooled)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _gains_line(summary: dict[str, Any], metric: str) -> str:
    """Best single vs best fused vs all, gains paired by seed (mean ± std, how many seeds gained); a group
    without single-encoder jobs (e.g. only the all-encoder model at another VE-dropout) says so instead."""
    s, noise = summary, f"seed noise (pooled std) {cell(summary.get('seed_std_pooled'))}."
    if not s.get("best_single"):
        best = s.get("all") or s.get("best_fused")
        what = f"`{best['subset']}` {mean_std({'mean': best.get(metric), 'std': best.get('std')})}" if best else "none"
        return f"No single-encoder job in this group, so no gain over one: {what}; {noise}"

    def gain(kind: str) -> str:
        spread = {"mean": s.get(f"{kind}_gain"), "std": s.get(f"{kind}_gain_std")}
        paired = mean_std(spread if spread["mean"] is not None else None, signed=True)
        return f"{paired} ({s.get(f'{kind}_gain_positive')})"

    line = f"Best single `{s['best_single']['subset']}`"
    if s.get("best_fused"):
        line += (f", best fused `{s['best_fused']['subset']}`: gain paired by seed {gain('fused')}; all "
                 f"`{s['all']['subset']}`: {gain('all')}; {noise}")
    return line


def study_markdown(metric: str, tables: dict[str, list[dict[str, Any]]], summaries: dict[str, dict[str, Any]],
                   folders: dict[str, str]) -> str:
    """The whole study.md (``folders``: each group's folder relative to the sweep, ``.`` for the sweep)."""
    columns, rows = paper_rows(tables, metric)
    lines = [f"# Encoder-subset study: `{metric}`", "",
             "Mean ± sample std (ddof=1) over seeds, n jobs per cell.", "", *_markdown(columns, rows)]
    agreements = {g: s["agreement"] for g, s in summaries.items() if "agreement" in s}
    if agreements:
        lines += ["", "## Retrain vs mask", "",
                  "Rankings of the subsets by their retrained jobs against the all-encoder job of the same seed "
                  "with the other encoders masked (Kendall's tau-b, Spearman's rho; undefined: a constant "
                  "ranking or fewer than two subsets; top-1 agree: the sets of best subsets, ties included, "
                  "share one).", "", *_markdown(*agreement_rows(agreements))]
    for g, s in summaries.items():
        folder = folders[g]
        lines += ["", f"## {g}", "", _gains_line(s, metric)]
        lines += ["", f"![subsets]({folder}/subsets.png)", "",
                  f"Subset table: [{folder}/subsets.md]({folder}/subsets.md)."]
        util = s.get("utilisation")
        if util and "skipped" not in util:
            lines += ["", "Utilisation per encoder (means over seeds; see docs/study.md for the definitions):", "",
                      *_markdown(*utilisation_rows(util))]
        if "agreement" in s and "skipped" not in s["agreement"]:
            diffs = s["agreement"]["difference"]
            if s["agreement"].get("retrained_from"):
                lines += ["", f"Retrained side: this group's own jobs, and for the subsets it did not train, "
                          f"group `{s['agreement']['retrained_from']}`'s."]
            lines += ["", "Masked minus retrained per subset (mean ± std over seeds): "
                      + ", ".join(f"`{k}` {mean_std(v, signed=True)}" for k, v in diffs.items()) + ".",
                      "", f"![retrain vs mask]({folder}/retrain_vs_mask.png)"]
        if s.get("leaning") and "skipped" not in s["leaning"]:
            lines += ["", f"![leaning]({folder}/leaning_heatmap.png)", "",
                      f"Leaning by answer type: [{folder}/leaning.md]({folder}/leaning.md)."]
    return "\n".join(lines) + "\n"


def log_wandb(sweep_dir: Path, tables: dict[str, tuple[list[str], list[list[Any]]]], images: dict[str, Path],
              project: str = "fusion") -> Path:
    """One new offline wandb run in ``<sweep>/study_wandb/`` with ``tables`` (name: columns, rows) and
    ``images`` (name: png); returns the run folder. Sync it later with ``wandb sync <folder>``."""
    import wandb

    folder = sweep_dir / "study_wandb"
    folder.mkdir(exist_ok=True)
    run = wandb.init(project=project, name=f"study-{sweep_dir.name}", job_type="study", dir=str(folder),
                     mode="offline", group=sweep_dir.name, reinit="create_new")
    try:
        data: dict[str, Any] = {}
        for name, (columns, rows) in tables.items():
            # Booleans as text: a column mixing them with a skipped row's reason would not type-check.
            cells = [[str(v) if isinstance(v, bool) else v for v in r] for r in rows]
            data[f"study/table/{name}"] = wandb.Table(columns=columns, data=cells)
        for name, path in images.items():
            data[f"study/{name}"] = wandb.Image(str(path))
        run.log(data)
        return Path(run.dir).parent
    finally:
        run.finish()
