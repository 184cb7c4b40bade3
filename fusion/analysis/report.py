"""An analysis mode's report folder: ``results.json`` (every number a figure shows), CSV tables, PNG figures,
``report.md`` embedding the figures, and the same tables and images in wandb when a wandb logger is set."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger, WandbLogger

from fusion.run import write_json_atomic
from fusion.stats import save_figure
from fusion.tasks.base import write_atomic

log = logging.getLogger(__name__)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 4 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Report:
    """Collects one mode's numbers, tables and figures, then writes them and logs them to wandb."""

    out_dir: Path
    title: str
    loggers: Sequence[Logger] = ()
    key: str = "analysis"
    results: dict[str, Any] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def text(self, markdown: str) -> None:
        self.sections.append(markdown.strip())

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], show: bool = True) -> Path:
        """``<name>.csv``, a wandb table, and (``show``) a markdown table in report.md."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)
        path = self.out_dir / f"{name}.csv"
        write_atomic(path, buffer.getvalue())
        self.files.append(path)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self.key}/{name}", columns=list(columns), data=[list(r) for r in rows])
        if show:
            self.sections.append(markdown_table(columns, rows))
        return path

    def figure(self, name: str, fig: Any, caption: str) -> Path:
        """Save a matplotlib ``Figure`` as ``<name>.png``, embed it in report.md and log it as a wandb image."""
        path = self.out_dir / f"{name}.png"
        save_figure(fig, path)
        self.files.append(path)
        self.sections.append(f"![{caption}]({path.name})\n\n*{caption}*")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{self.key}/{name}", images=[str(path)], caption=[caption])
        return path

    def write(self) -> dict[str, Any]:
        """``results.json`` and ``report.md``; returns the results."""
        write_json_atomic(self.out_dir / "results.json", self.results)
        body = "\n\n".join([f"# {self.title}", *self.sections])
        write_atomic(self.out_dir / "report.md", body + "\n")
        log.info("%s: report in %s", self.title, self.out_dir)
        return self.results


def heatmap(
    values: torch.Tensor,
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    vmin: float | None = 0.0,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> Any:
    """A labelled heatmap of ``values`` (R, C) with a colour bar; cells annotated while they stay legible."""
    from matplotlib.figure import Figure

    values = values.detach().float().cpu()
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(2.5 + min(0.7 * n_cols, 16), 1.6 + min(0.4 * n_rows, 12)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(values.numpy(), vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    if n_rows * n_cols <= 150:
        lo, hi = image.get_clim()
        for r in range(n_rows):
            for c in range(n_cols):
                v = float(values[r, c])
                # Light text on the dark end of the colour map, dark text on the bright end.
                dark = (v - lo) < 0.6 * (hi - lo) if cmap == "viridis" else abs(v - (lo + hi) / 2) > 0.3 * (hi - lo)
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    tilt = n_cols > 4 or max(len(str(c)) for c in columns) > 8
    ax.set_xticks(range(n_cols), list(columns), rotation=45 if tilt else 0, ha="right" if tilt else "center")
    ax.set_yticks(range(n_rows), list(rows))
    # Long position axes (causal tracing) stay legible with smaller tick labels.
    ax.tick_params(axis="x", labelsize=10 if n_cols <= 30 else 6)
    ax.tick_params(axis="y", labelsize=10 if n_rows <= 30 else 6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar)
    return fig
