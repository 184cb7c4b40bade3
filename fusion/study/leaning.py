"""Which encoder the fused model leans on for which question type (the all-encoder jobs' analyses).

Every job of the study's subset with all encoders (one per seed) is analysed on its best checkpoint (the
one its test metrics come from) by two of ``eval.py``'s analysis modes, run in process on the job's own
config, their report folders in ``<job>/leaning/<mode>/``:

- ``attention``: the attention mass the [CLS] query and the text queries give each encoder's tokens, split
  by answer type (mean over layers and heads);
- ``encoder_ablation`` (VE-dropout at inference): per answer type, the metric drop when each encoder alone
  is removed (the full model minus the model without it).

Both are aggregated over seeds (mean, sample std, min, max, the value per seed) into ``leaning.csv``,
``leaning.md``, ``leaning.png``, ``leaning_heatmap.png`` and the ``leaning`` entry of ``summary.json``
(:func:`fusion.study.cli.write_study` calls :func:`write_leaning` after the subset table). The same
``encoder_ablation`` results feed the retrain-vs-mask agreement (:mod:`fusion.study.agreement`) and the
masked utilisation measures (:mod:`fusion.study.utilisation`).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402

from fusion.io import save_figure, write_text  # noqa: E402
from fusion.study.common import MAX, MIN, STD, spread, write_csv  # noqa: E402
from fusion.study.common import seed_key as _seed_key  # noqa: E402
from fusion.study.common import seed_name as _seed_name  # noqa: E402
from fusion.study.jobs import analysis_config, best_checkpoint, sweep_cwd  # noqa: E402

__all__ = ["analyse_full_jobs", "analyse_job", "leaning", "write_leaning"]

# The leaning's measures per (answer type, encoder): attention mass of each query kind, VE-dropout drop.
MEASURES = ("attention_cls", "attention_text", "drop_when_removed")
# The row of the whole split beside the answer types.
ALL = "all"


def analyse_job(job: str | Path, stage: str = "test") -> dict[str, Any]:
    """``eval.py mode=attention`` and ``mode=encoder_ablation`` on a job's :func:`best_checkpoint`, in process.

    Each mode gets the job's ``config_resolved.yaml`` with conf/analysis/default.yaml, the split the study
    metric's ``stage`` names (``task.<stage>_split``), no loggers (no new wandb run per analysis) and its
    report folder ``<job>/leaning/<mode>/``. It runs in the folder the sweep ran in (``.hydra/hydra.yaml``'s
    ``runtime.cwd``): the configs' relative paths (``./cache``, ``./data``) are relative to it. Returns the
    ``checkpoint`` (relative to the job), its ``checkpoint_kind`` and each mode's results.
    """
    from fusion.analysis import MODES  # here: it loads torch and the models, which only the leaning needs

    job = Path(job).resolve()
    ckpt, kind = best_checkpoint(job)
    results: dict[str, Any] = {"checkpoint": str(ckpt.relative_to(job)), "checkpoint_kind": kind}
    with contextlib.chdir(sweep_cwd(job)):
        for mode in ("attention", "encoder_ablation"):
            cfg = analysis_config(job, mode, stage, ckpt, job / "leaning")
            try:
                results[mode] = MODES[mode](cfg)
            except Exception as e:
                raise RuntimeError(
                    f"study: eval.py mode={mode} on {str(ckpt)!r} failed ({type(e).__name__}: {e}); the table is "
                    "written; `python -m fusion.study <sweep dir> --no-leaning` (or "
                    "hydra.callbacks.study.leaning=false) skips the leaning and the masking"
                ) from e
    return results


def leaning(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the analyses of the all-encoder jobs over seeds: per answer type (and ``all``) and encoder,
    each of :data:`MEASURES` as mean, sample std, min, max, n and the value per seed, and the encoder it
    leans on per measure (largest mean; ``tie`` when the largest means are equal).

    ``jobs``: one dict per job with ``job``, ``seed``, ``checkpoint``, ``checkpoint_kind`` and the results of
    the ``attention`` and ``encoder_ablation`` modes (:func:`analyse_job`). Jobs of one seed are averaged first.
    """
    first = jobs[0]
    encoders = list(first["attention"]["encoders"])
    values = {j["job"]: _job_leaning(j["attention"], j["encoder_ablation"]) for j in jobs}
    types = list(values[first["job"]])
    seeds = sorted({j["seed"] for j in jobs}, key=_seed_key)
    by_type: dict[str, Any] = {}
    for t in types:
        # The split is the same for every seed (the task's data does not follow the seed): the first job's n.
        entry: dict[str, Any] = {"n": _type_count(first["attention"], t), "encoders": {}, "leans_on": {}}
        for e in encoders:
            entry["encoders"][e] = {}
            for m in MEASURES:
                per_seed = {}
                for seed in seeds:
                    vs = [values[j["job"]][t][e][m] for j in jobs if j["seed"] == seed]
                    if vs := [v for v in vs if v is not None]:
                        per_seed[_seed_name(seed)] = statistics.fmean(vs)
                stats = spread(list(per_seed.values())) if per_seed else None
                entry["encoders"][e][m] = {**stats, "per_seed": per_seed} if stats else None
        for m in MEASURES:
            means = sorted(((s["mean"], e) for e in encoders if (s := entry["encoders"][e][m])), reverse=True)
            # "tie" rather than the first name when the top means are equal (e.g. no drop for any encoder).
            tied = len(means) > 1 and means[0][0] == means[1][0]
            entry["leans_on"][m] = "tie" if tied else means[0][1] if means else None
        by_type[t] = entry
    return {
        "subset": "+".join(encoders),
        "encoders": encoders,
        "split": first["attention"]["split"],
        "metric": first["encoder_ablation"]["metric"],
        "answer_types": [t for t in types if t != ALL],
        "seeds": seeds,
        "jobs": [{k: j[k] for k in ("job", "seed", "checkpoint", "checkpoint_kind")} for j in jobs],
        "tokens_per_image": first["attention"].get("tokens_per_image"),
        "measures": {
            "attention_cls": "attention mass from the [CLS] query (LM head: the first answer token) to the encoder's "
                             "tokens (mean: layers, heads)",
            "attention_text": "attention mass from the text queries (LM head: the prompt's) to the encoder's tokens "
                              "(mean: layers, heads)",
            "drop_when_removed": "metric of the full model minus the model without this encoder (VE-dropout)",
        },
        "by_type": by_type,
    }


def analyse_full_jobs(sweep_dir: Path, rows: list[dict[str, Any]], full: str, stage: str) -> list[dict[str, Any]]:
    """:func:`analyse_job` on every job of subset ``full`` among ``rows`` (one group's), each with its
    ``job`` and ``seed``; empty when ``full`` has a single encoder (nothing to mask)."""
    if "+" not in full:
        return []
    return [{"job": r["job"], "seed": r["seed"], **analyse_job(sweep_dir / r["job"], stage)}
            for r in rows if r["subset"] == full]


def write_leaning(folder: Path, analysed: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`leaning` of the :func:`analyse_full_jobs` results, written as leaning.csv, leaning.md,
    leaning.png (bars) and leaning_heatmap.png into ``folder``; ``{"skipped": why}`` without any."""
    if not analysed:
        return {"skipped": "no all-encoder job with more than one encoder"}
    result = leaning(analysed)
    table = [
        {"answer_type": t, "encoder": e, "n": entry["n"], "seeds": ",".join(map(str, result["seeds"])),
         **{k: v for m in MEASURES for k, v in _spread_columns(m, entry["encoders"][e][m]).items()}}
        for t, entry in result["by_type"].items() for e in result["encoders"]
    ]
    write_csv(folder / "leaning.csv", table, list(table[0]))
    write_text(folder / "leaning.md", _leaning_markdown(result))
    _leaning_plot(result, folder / "leaning.png")
    _leaning_heatmap(result, folder / "leaning_heatmap.png")
    result["files"] = ["leaning.csv", "leaning.md", "leaning.png", "leaning_heatmap.png"]
    return result


def _job_leaning(attention: dict[str, Any], ablation: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """One job's {answer type (and ``all``): {encoder: {measure: value}}} from its two analyses' results.

    A drop is None where an answer type has no example (the metric leaves it out).
    """
    from fusion.analysis.encoder_ablation import subset_name  # lazily: see analyse_job

    encoders, groups = list(attention["encoders"]), list(attention["groups"])
    metric, subsets = ablation["metric"], ablation["subsets"]
    full = subsets[subset_name(encoders)]
    types = list(attention["by"]) if attention.get("split_by") == "answer_type" else []
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t in [ALL, *types]:
        part = attention if t == ALL else attention["by"][t]
        # The query that gives the answer and the question's queries: [CLS] and text (classifier), or the
        # first answer token and the prompt (LM head).
        answer_query, text_query = ("cls", "text") if "cls" in part else ("answer", "prompt")
        key = metric if t == ALL else f"{metric}_{t}"
        out[t] = {}
        for e in encoders:
            without = subsets[subset_name([x for x in encoders if x != e])]
            g = groups.index(e)
            out[t][e] = {
                "attention_cls": _mean_over_heads(part[answer_query], g),
                "attention_text": _mean_over_heads(part[text_query], g),
                "drop_when_removed": full[key] - without[key] if key in full and key in without else None,
            }
    return out


def _mean_over_heads(mass: list[list[list[float]]], group: int) -> float:
    """Mean over layers and heads of ``mass[layer][head][group]``."""
    return statistics.fmean(head[group] for layer in mass for head in layer)


def _type_count(attention: dict[str, Any], answer_type: str) -> int:
    if answer_type == ALL:
        return int(attention["metrics"]["n"])
    return int(attention["by"][answer_type]["n"])


def _spread_columns(measure: str, stats: dict[str, Any] | None) -> dict[str, Any]:
    stats = stats or {}
    return {measure: stats.get("mean"), measure + STD: stats.get("std"), measure + MIN: stats.get("min"),
            measure + MAX: stats.get("max")}


def _leaning_cell(stats: dict[str, Any] | None, signed: bool = False) -> str:
    if not stats:
        return ""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if stats["std"] is None:
        return fmt.format(stats["mean"])
    return f"{fmt.format(stats['mean'])} ± {stats['std']:.3f} ({fmt.format(stats['min'])}..{fmt.format(stats['max'])})"


def _leaning_markdown(result: dict[str, Any]) -> str:
    encoders, metric = result["encoders"], result["metric"]
    jobs = ", ".join(f"`{j['job']}` (seed {j['seed']}, {j['checkpoint_kind']}: `{j['checkpoint']}`)"
                     for j in result["jobs"])
    lines = [
        "# Which encoder the model leans on, by answer type",
        "",
        f"Jobs of `{result['subset']}`: {jobs}; split `{result['split']}` (n = examples per answer type). "
        "Each cell: mean ± sample std over seeds (min..max); `leans on`: the encoder with the largest mean. "
        "Each job's full reports: `<job>/leaning/attention/report.md`, `<job>/leaning/encoder_ablation/report.md`.",
    ]
    titles = {
        "attention_cls": "Attention mass from [CLS] to each encoder's tokens (mean over layers and heads; the "
                         "rest goes to the text and [CLS])",
        "attention_text": "Attention mass from the text queries to each encoder's tokens (mean over layers and heads)",
        "drop_when_removed": f"VE-dropout: `{metric}` of the full model minus the model without the encoder "
                             "(the drop when it alone is removed)",
    }
    for m in MEASURES:
        lines += ["", f"## {titles[m]}", "", "| answer type | n | " + " | ".join(encoders) + " | leans on |",
                  "|" + "---|" * (len(encoders) + 3)]
        for t, entry in result["by_type"].items():
            cells = [_leaning_cell(entry["encoders"][e][m], signed=m == "drop_when_removed") for e in encoders]
            lines.append(f"| {t} | {entry['n']} | " + " | ".join(cells) + f" | {entry['leans_on'][m] or ''} |")
    if result.get("tokens_per_image"):
        tokens = ", ".join(f"`{n}` {c}" for n, c in result["tokens_per_image"].items())
        lines += ["", f"Visual tokens per image (a group's attention mass grows with its token count): {tokens}."]
    return "\n".join(lines) + "\n"


def _leaning_plot(result: dict[str, Any], path: Path) -> None:
    """One panel per measure: per answer type, a bar per encoder (mean), min..max over seeds, a dot per seed."""
    encoders, types = result["encoders"], list(result["by_type"])
    titles = {"attention_cls": "[CLS] attention mass", "attention_text": "text queries' attention mass",
              "drop_when_removed": f"{result['metric']} drop when removed (VE-dropout)"}
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4.5 * len(MEASURES), 4), squeeze=False)
    width = 0.8 / len(encoders)
    for ax, m in zip(axes[0], MEASURES, strict=True):
        for i, e in enumerate(encoders):
            xs = [k + (i - (len(encoders) - 1) / 2) * width for k in range(len(types))]
            stats = [result["by_type"][t]["encoders"][e][m] for t in types]
            means = [s["mean"] if s else math.nan for s in stats]
            low = [max(0.0, s["mean"] - s["min"]) if s else 0.0 for s in stats]
            high = [max(0.0, s["max"] - s["mean"]) if s else 0.0 for s in stats]
            ax.bar(xs, means, width, yerr=[low, high], capsize=3, label=e)
            for x, s in zip(xs, stats, strict=True):
                seeds = list(s["per_seed"].values()) if s else []
                ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(types)), types, fontsize=8)
        ax.set_xlabel("answer type")
        ax.set_title(titles[m], fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['subset']}: which encoder the model leans on (bars: mean over seeds {result['seeds']}, "
                 "error bars min..max, dots: one seed each)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def _leaning_heatmap(result: dict[str, Any], path: Path) -> None:
    """Answer types x encoders, one panel per measure, the mean over seeds in each cell."""
    encoders, types = result["encoders"], list(result["by_type"])
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(2.2 + 1.6 * len(encoders) * len(MEASURES),
                                                        1.4 + 0.45 * len(types)), squeeze=False)
    for ax, m in zip(axes[0], MEASURES, strict=True):
        values = [[(s["mean"] if (s := result["by_type"][t]["encoders"][e][m]) else math.nan) for e in encoders]
                  for t in types]
        diverging = m == "drop_when_removed"  # a drop can be negative: masking helped
        finite = [abs(v) for row in values for v in row if math.isfinite(v)] or [1.0]
        limit = max(finite) or 1.0
        image = ax.imshow(values, cmap="RdBu_r" if diverging else "viridis", aspect="auto",
                          vmin=-limit if diverging else None, vmax=limit if diverging else None)
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if diverging else "white")
        ax.set_xticks(range(len(encoders)), encoders, fontsize=7, rotation=20)
        ax.set_yticks(range(len(types)), types, fontsize=7)
        ax.set_title(m.replace("_", " "), fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    fig.suptitle(f"{result['subset']}: leaning per answer type (mean over seeds {result['seeds']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
