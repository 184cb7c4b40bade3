"""The encoder-subset study: one table and one plot from a multirun's jobs (does fusing beat one encoder?).

:class:`SubsetTable` is a Hydra callback: when the sweep of ``+experiment=zoo/complementarity`` ends it
reads every job's ``metrics.json`` and ``config_resolved.yaml`` and writes, into the sweep folder,
``subsets.csv`` / ``subsets.md`` (one row per encoder subset), ``subsets.png`` (the metric per subset,
the best single encoder as a line) and ``summary.json``. ``python -m fusion.zoo.study <sweep dir>`` does
the same for a finished sweep.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

__all__ = ["SubsetTable", "collect", "summarize", "write_study"]


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job below ``sweep_dir``: ``subset`` ("a+b"), ``size``, ``job`` and its metrics."""
    sweep_dir = Path(sweep_dir)
    rows = []
    for metrics_path in sorted(sweep_dir.glob("*/metrics.json")):
        job = metrics_path.parent
        config_path = job / "config_resolved.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"study: {str(job)!r} has metrics.json but no config_resolved.yaml")
        encoders = list(OmegaConf.load(config_path).get("encoder") or {})
        metrics = json.loads(metrics_path.read_text())
        rows.append({"subset": "+".join(encoders), "size": len(encoders), "job": job.name, **metrics})
    # Singles first, then pairs, then the triple; alphabetical within a size.
    return sorted(rows, key=lambda r: (r["size"], r["subset"]))


def summarize(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Best single encoder vs the best and the full fusion on ``metric``."""
    scored = [r for r in rows if metric in r]
    if not scored:
        raise ValueError(f"study: no job reports {metric!r}; reported: {sorted({k for r in rows for k in r})}")
    singles = [r for r in scored if r["size"] == 1]
    fused = [r for r in scored if r["size"] > 1]
    best = lambda rs: max(rs, key=lambda r: r[metric]) if rs else None  # noqa: E731
    out: dict[str, Any] = {"metric": metric}
    for key, row in (("best_single", best(singles)), ("best_fused", best(fused))):
        out[key] = {"subset": row["subset"], metric: row[metric]} if row else None
    full = max(scored, key=lambda r: r["size"])
    out["all"] = {"subset": full["subset"], metric: full[metric]}
    if out["best_single"] and out["best_fused"]:
        out["fused_gain"] = out["best_fused"][metric] - out["best_single"][metric]
        out["all_gain"] = full[metric] - out["best_single"][metric]
    return out


def write_study(sweep_dir: str | Path, metric: str = "test/acc") -> dict[str, Any]:
    """Write subsets.csv, subsets.md, subsets.png and summary.json into ``sweep_dir``; returns the summary."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"study: no <job>/metrics.json below {str(sweep_dir)!r}; did every job fail?")
    summary = summarize(rows, metric)
    columns = ["subset", "size", "job"] + sorted({k for r in rows for k in r} - {"subset", "size", "job"})
    with (sweep_dir / "subsets.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    shown = ["subset"] + [c for c in columns if c.startswith("test/acc") or c == "val/acc"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in shown) + " |")
    (sweep_dir / "subsets.md").write_text("\n".join(lines) + "\n")
    _plot(rows, metric, summary, sweep_dir / "subsets.png")
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print((sweep_dir / "subsets.md").read_text() + json.dumps(summary, indent=2))
    return summary


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "")


def _plot(rows: list[dict[str, Any]], metric: str, summary: dict[str, Any], path: Path) -> None:
    rows = [r for r in rows if metric in r]
    colors = {1: "tab:gray", 2: "tab:blue", 3: "tab:green"}
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    ax.bar(range(len(rows)), [r[metric] for r in rows], color=[colors.get(r["size"], "tab:purple") for r in rows])
    ax.set_xticks(range(len(rows)), [r["subset"].replace("+", "\n+") for r in rows], fontsize=8)
    if summary["best_single"]:
        ax.axhline(summary["best_single"][metric], color="black", linestyle="--", label="best single encoder")
    # run.train writes the majority-answer baseline as <stage>/majority_<metric name>.
    stage, _, name = metric.partition("/")
    majority = rows[0].get(f"{stage}/majority_{name}")
    if majority is not None:
        ax.axhline(majority, color="tab:red", linestyle=":", label="majority answer")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    ax.set_ylabel(metric)
    ax.set_title("encoder subsets (gray: one, blue: two, green: three)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class SubsetTable(Callback):
    """Hydra callback: :func:`write_study` on the sweep folder when the multirun ends."""

    def __init__(self, metric: str = "test/acc") -> None:
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_study(config.hydra.sweep.dir, self.metric)


def main() -> None:
    parser = argparse.ArgumentParser(description="Collect an encoder-subset sweep into a table and a plot.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (logs/train/multiruns/<time>)")
    parser.add_argument("--metric", default="test/acc")
    args = parser.parse_args()
    write_study(args.sweep_dir, args.metric)


if __name__ == "__main__":
    main()
