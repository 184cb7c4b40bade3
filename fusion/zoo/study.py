"""The encoder-subset study: one table and one plot from a multirun's jobs (does fusing beat one encoder?).

:class:`SubsetTable` is a Hydra callback: when the sweep of ``+experiment=zoo/complementarity`` (encoder
subsets x seeds) ends it reads every job's ``metrics.json`` and ``config_resolved.yaml`` and writes, into
the sweep folder:

- ``jobs.csv``: one row per finished job (subset, seed, job folder, every metric);
- ``subsets.csv`` / ``subsets.md``: one row per encoder subset, every metric as its mean over the jobs
  (seeds), ``n`` jobs, the seeds, and for the study metric its sample standard deviation (``ddof=1``;
  empty for one job), min and max (the csv also has every metric's std);
- ``subsets.png``: the metric's mean per subset (a diamond), error bars from min to max over seeds, one dot
  per seed, the best single encoder's mean as a line (and the majority answer, if on the zoomed axis);
- ``summary.json``: best single encoder vs best fused subset vs all encoders (subsets picked by their mean),
  each with mean, std, min, max, n and the value per seed, and the gains of best-fused and all over the best
  single **paired by seed** (the fused subset's seed-s run minus the best single's seed-s run), with their
  mean, std, min, max and how many seeds gained, beside the pooled seed noise of one subset.

Then, with ``leaning`` (default), which encoder the model leans on for which question type
(:func:`write_leaning`): every job of the subset with all encoders (one per seed) is analysed on its best
checkpoint (the one its test metrics come from) by two of ``eval.py``'s analysis modes, run in process on
the job's own config, their report folders in ``<job>/leaning/<mode>/``:

- ``attention``: the attention mass the [CLS] query and the text queries give each encoder's tokens, split
  by answer type (mean over layers and heads);
- ``encoder_ablation`` (VE-dropout at inference): per answer type, the metric drop when each encoder alone
  is removed (the full model minus the model without it).

Both are aggregated over seeds (mean, sample std, min, max, the value per seed) into ``leaning.csv``,
``leaning.md``, ``leaning.png`` and the ``leaning`` entry of ``summary.json``.

``python -m fusion.zoo.study <sweep dir>`` does the same for a finished or stopped sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

__all__ = [
    "SubsetTable", "aggregate", "analyse_job", "best_checkpoint", "collect", "leaning", "spread", "summarize",
    "write_leaning", "write_study",
]

# Columns that describe a job or a subset, not a metric.
KEYS = ("subset", "size", "seed", "job")
# Suffixes of the spread columns of subsets.csv (a metric name never contains ':').
STD, MIN, MAX = ":std", ":min", ":max"
CONF = Path(__file__).resolve().parents[2] / "conf"
# The leaning's measures per (answer type, encoder): attention mass of each query kind, VE-dropout drop.
MEASURES = ("attention_cls", "attention_text", "drop_when_removed")
# The row of the whole split beside the answer types.
ALL = "all"


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job below ``sweep_dir``: ``subset`` ("a+b"), ``size``, ``seed``, ``job``, metrics.

    ``seed`` is the job's resolved ``seed`` (None if its config has none).
    """
    sweep_dir = Path(sweep_dir)
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_path.parent
        config_path = job / "config_resolved.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"study: {str(job)!r} has metrics.json but no config_resolved.yaml")
        config = OmegaConf.load(config_path)
        encoders = list(config.get("encoder") or {})
        metrics = json.loads(metrics_path.read_text())
        rows.append(
            {"subset": "+".join(encoders), "size": len(encoders), "seed": config.get("seed"), "job": job.name,
             **metrics}
        )
    # Singles first, then pairs, then the triple; alphabetical within a size; then by seed.
    return sorted(rows, key=lambda r: (r["size"], r["subset"], _seed_key(r["seed"]), _job_key(r["job"])))


def spread(values: list[float]) -> dict[str, Any]:
    """``mean``, sample ``std`` (ddof=1; None for one value), ``min``, ``max`` and ``n`` of ``values``."""
    n = len(values)
    std = statistics.stdev(values) if n > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": n}


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
            "seeds": ",".join(str(s) for s in sorted({j["seed"] for j in jobs}, key=_seed_key)),
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
        by_seed = sorted(entry["by_seed"].items(), key=lambda item: _seed_key(item[0]))
        return {
            "subset": entry["subset"], metric: stats["mean"], "std": stats["std"], "min": stats["min"],
            "max": stats["max"], "n": stats["n"],
            "per_seed": {_seed_name(s): statistics.fmean(vs) for s, vs in by_seed},
        }

    def mean_of(entry: dict[str, Any]) -> float:
        return statistics.fmean([v for vs in entry["by_seed"].values() for v in vs])

    best = lambda es: max(es, key=mean_of) if es else None  # noqa: E731
    singles = [e for e in per_subset.values() if e["size"] == 1]
    fused = [e for e in per_subset.values() if e["size"] > 1]
    full = max(per_subset.values(), key=lambda e: (e["size"], mean_of(e)))
    seeds = sorted({r["seed"] for r in scored}, key=_seed_key)
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
            gains = {_seed_name(s): statistics.fmean(entry["by_seed"][s]) - statistics.fmean(single[s]) for s in shared}
            stats = spread(list(gains.values())) if gains else None
            out[f"{key}_gain"] = stats["mean"] if stats else None
            out[f"{key}_gain_per_seed"] = gains
            out[f"{key}_gain_std"] = stats["std"] if stats else None
            out[f"{key}_gain_min"] = stats["min"] if stats else None
            out[f"{key}_gain_max"] = stats["max"] if stats else None
            out[f"{key}_gain_positive"] = f"{sum(g > 0 for g in gains.values())} of {len(gains)} seeds"
    return out


def write_study(sweep_dir: str | Path, metric: str = "test/acc", leaning: bool = True) -> dict[str, Any]:
    """Write jobs.csv, subsets.csv, subsets.md, subsets.png and summary.json into ``sweep_dir``, then with
    ``leaning`` the leaning by answer type (:func:`write_leaning`, also in summary.json); returns the summary."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"study: no <job>/metrics.json below {str(sweep_dir)!r}; did every job fail?")
    summary = summarize(rows, metric)
    _write_csv(sweep_dir / "jobs.csv", rows, list(KEYS))
    table = aggregate(rows, metric)
    _write_csv(sweep_dir / "subsets.csv", table, ["subset", "size", "n", "seeds"])
    (sweep_dir / "subsets.md").write_text(_markdown(table, metric))
    _plot(rows, table, metric, summary, sweep_dir / "subsets.png")
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print((sweep_dir / "subsets.md").read_text() + json.dumps(summary, indent=2))
    if leaning:
        # After the table is on disk: the analyses take longer, and a failing one must not lose the table.
        summary["leaning"] = write_leaning(sweep_dir, rows, summary, metric)
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ---- which encoder the model leans on, by answer type ------------------------------------------------


def best_checkpoint(job: str | Path) -> tuple[Path, str]:
    """The checkpoint a job's test metrics come from, and its kind: ``best`` (the monitored top-1 file of
    conf/callbacks' ``model_checkpoint``, ``checkpoints/epoch_*.ckpt``), else ``last`` (``last.ckpt``)."""
    folder = Path(job) / "checkpoints"
    best = [p for p in folder.glob("*.ckpt") if not p.name.startswith(("last", "hpc_ckpt_"))]
    if best:
        # save_top_k=1 writes a new file only when the monitored metric improves: the newest one is the best.
        return max(best, key=lambda p: p.stat().st_mtime), "best"
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt", "last"
    raise FileNotFoundError(f"study: no checkpoint in {str(folder)!r} (neither a best epoch_*.ckpt nor last.ckpt)")


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
    config = OmegaConf.load(job / "config_resolved.yaml")
    ckpt, kind = best_checkpoint(job)
    analysis = OmegaConf.load(CONF / "analysis" / "default.yaml")
    analysis.attention.split_by = "auto"  # answer types when the task has them
    out = job / "leaning"
    split = OmegaConf.select(config, f"task.{stage}_split", default=stage)
    results: dict[str, Any] = {"checkpoint": str(ckpt.relative_to(job)), "checkpoint_kind": kind}
    with contextlib.chdir(_sweep_cwd(job)):
        for mode in ("attention", "encoder_ablation"):
            cfg = OmegaConf.merge(config, {"mode": mode, "ckpt_path": str(ckpt), "split": split, "analysis": analysis})
            # Not the job's own folder: an analysis writes its config_resolved.yaml into paths.output_dir.
            cfg.paths.output_dir = str(out)
            cfg.analysis.dir = str(out / mode)
            cfg.logger = None
            try:
                results[mode] = MODES[mode](cfg)
            except Exception as e:
                raise RuntimeError(
                    f"study: eval.py mode={mode} on {str(ckpt)!r} failed ({type(e).__name__}: {e}); the table is "
                    "written; `python -m fusion.zoo.study <sweep dir> --no-leaning` (or "
                    "hydra.callbacks.subset_table.leaning=false) skips the leaning"
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
            "attention_cls": "attention mass from the [CLS] query to the encoder's tokens (mean: layers, heads)",
            "attention_text": "attention mass from the text queries to the encoder's tokens (mean: layers, heads)",
            "drop_when_removed": "metric of the full model minus the model without this encoder (VE-dropout)",
        },
        "by_type": by_type,
    }


def write_leaning(
    sweep_dir: str | Path, rows: list[dict[str, Any]], summary: dict[str, Any], metric: str = "test/acc"
) -> dict[str, Any]:
    """Analyse the jobs of the all-encoder subset (:func:`analyse_job`) and write leaning.csv, leaning.md and
    leaning.png into ``sweep_dir``; returns :func:`leaning` (``{"skipped": why}`` when there is nothing to do).

    ``rows`` and ``summary``: :func:`collect`'s and :func:`summarize`'s; the subset is ``summary["all"]``.
    """
    sweep_dir = Path(sweep_dir)
    full = summary["all"]["subset"]
    if "+" not in full:
        print(f"study: no leaning; the largest subset {full!r} has a single encoder")
        return {"skipped": f"the largest subset {full!r} has a single encoder"}
    stage = metric.partition("/")[0]
    jobs = [r for r in rows if r["subset"] == full]
    analysed = [{"job": r["job"], "seed": r["seed"], **analyse_job(sweep_dir / r["job"], stage)} for r in jobs]
    result = leaning(analysed)
    table = [
        {"answer_type": t, "encoder": e, "n": entry["n"], "seeds": ",".join(map(str, result["seeds"])),
         **{k: v for m in MEASURES for k, v in _spread_columns(m, entry["encoders"][e][m]).items()}}
        for t, entry in result["by_type"].items() for e in result["encoders"]
    ]
    _write_csv(sweep_dir / "leaning.csv", table, list(table[0]))
    (sweep_dir / "leaning.md").write_text(_leaning_markdown(result))
    _leaning_plot(result, sweep_dir / "leaning.png")
    result["files"] = ["leaning.csv", "leaning.md", "leaning.png"]
    print((sweep_dir / "leaning.md").read_text())
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
        key = metric if t == ALL else f"{metric}_{t}"
        out[t] = {}
        for e in encoders:
            without = subsets[subset_name([x for x in encoders if x != e])]
            g = groups.index(e)
            out[t][e] = {
                "attention_cls": _mean_over_heads(part["cls"], g),
                "attention_text": _mean_over_heads(part["text"], g),
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_cwd(job: Path) -> Path:
    """The folder the job ran in (its ``.hydra/hydra.yaml``), else the current one."""
    hydra_yaml = job / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    return Path(cwd) if cwd else Path.cwd()


def _write_csv(path: Path, rows: list[dict[str, Any]], first: list[str]) -> None:
    rest = sorted({k for r in rows for k in r} - set(first))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=first + rest)
        writer.writeheader()
        writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _seed_key(seed: Any) -> tuple[int, Any]:
    return (0, seed) if isinstance(seed, int) else (1, str(seed))


def _seed_name(seed: Any) -> str:
    return str(seed)


def _job_key(job: str) -> tuple[int, Any]:
    return (0, int(job)) if job.isdigit() else (1, job)


class SubsetTable(Callback):
    """Hydra callback: :func:`write_study` on the sweep folder when the multirun ends (``leaning``: also the
    leaning by answer type of the all-encoder jobs)."""

    def __init__(self, metric: str = "test/acc", leaning: bool = True) -> None:
        self.metric = metric
        self.leaning = leaning

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_study(config.hydra.sweep.dir, self.metric, leaning=self.leaning)


def main() -> None:
    parser = argparse.ArgumentParser(description="Collect an encoder-subset sweep into a table and a plot, and "
                                     "analyse which encoder its all-encoder jobs lean on per answer type.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (logs/train/multiruns/<time>)")
    parser.add_argument("--metric", default="test/acc")
    parser.add_argument("--no-leaning", dest="leaning", action="store_false",
                        help="only the table: skip the attention / VE-dropout analyses of the all-encoder jobs")
    args = parser.parse_args()
    write_study(args.sweep_dir, args.metric, leaning=args.leaning)


if __name__ == "__main__":
    main()
