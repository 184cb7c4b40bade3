"""An analysis mode's report folder: ``results.json`` (every number a figure shows; a heatmap's matrix under
``figures.<name>``), CSV tables, PNG figures, ``report.md`` embedding the figures, and the same tables and images
in wandb when a wandb logger is set.

An undefined number (NaN, e.g. a recovery over no pairs) is ``null`` in results.json (strict JSON), an empty
CSV cell, and a masked (grey) heatmap cell."""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger, WandbLogger

from fusion.io import save_figure, write_json, write_text

log = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """``value`` with tensors as lists and every non-finite float (NaN, inf) as None, nested in dicts, lists and
    tuples: what strict JSON can hold (``json.dumps`` would write a bare ``NaN``)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 4 decimals."""

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
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
        """``<name>.csv``, a wandb table ``<key>/table/<name>``, and (``show``) a markdown table in report.md; an
        undefined cell (None, NaN) is empty in the CSV and None in wandb."""
        rows = [jsonable(list(r)) for r in rows]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)  # None: an empty cell
        path = self.out_dir / f"{name}.csv"
        write_text(path, buffer.getvalue())
        self.files.append(path)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                # Not the figure's key: a table and a figure of one name would overwrite each other in wandb.
                logger.log_table(key=f"{self.key}/table/{name}", columns=list(columns), data=rows)
        if show:
            self.sections.append(markdown_table(columns, rows))
        return path

    def figure(self, name: str, fig: Any, caption: str) -> Path:
        """Save a matplotlib ``Figure`` as ``<name>.png``, embed it in report.md and log it as wandb image
        ``<key>/<name>``."""
        path = self.out_dir / f"{name}.png"
        save_figure(fig, path, dpi=100)
        self.files.append(path)
        self.sections.append(f"![{caption}]({path.name})\n\n*{caption}*")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{self.key}/{name}", images=[str(path)], caption=[caption])
        return path

    def heatmap(self, name: str, values: torch.Tensor, rows: Sequence[str], columns: Sequence[str], caption: str,
                **style: Any) -> Any:
        """:func:`heatmap` of ``values`` (R, C) as figure ``name``; the matrix it plots goes into results.json
        as ``figures.<name>`` = ``{"rows", "columns", "values"}`` (``style``: :func:`heatmap`'s labels).
        Returns the matplotlib figure."""
        figures = self.results.setdefault("figures", {})
        figures[name] = {"rows": list(rows), "columns": list(columns), "values": jsonable(values.detach().cpu())}
        fig = heatmap(values, rows, columns, **style)
        self.figure(name, fig, caption)
        return fig

    def heatmaps(self, name: str, panels: Mapping[str, torch.Tensor], rows: Sequence[str], columns: Sequence[str],
                 caption: str, **style: Any) -> Any:
        """:func:`heatmap_panels` (one heatmap (R, C) per entry of ``panels``) as figure ``name``; results.json
        gets ``figures.<name>`` = ``{"rows", "columns", "panels": {panel: values}}``. Returns the figure."""
        figures = self.results.setdefault("figures", {})
        figures[name] = {"rows": list(rows), "columns": list(columns),
                         "panels": {k: jsonable(v.detach().cpu()) for k, v in panels.items()}}
        fig = heatmap_panels(panels, rows, columns, **style)
        self.figure(name, fig, caption)
        return fig

    def write(self) -> dict[str, Any]:
        """``results.json`` (strict JSON: undefined numbers are null) and ``report.md``; returns the results."""
        self.results = jsonable(self.results)
        write_json(self.out_dir / "results.json", self.results)
        body = "\n\n".join([f"# {self.title}", *self.sections])
        write_text(self.out_dir / "report.md", body + "\n")
        log.info("%s: report in %s", self.title, self.out_dir)
        return self.results


def heatmap(values: torch.Tensor, rows: Sequence[str], columns: Sequence[str], title: str, **labels: Any) -> Any:
    """A labelled heatmap of ``values`` (R, C) with a colour bar; cells annotated while they stay legible.
    Non-finite cells (NaN: undefined) are masked: grey, no annotation. ``labels``: :func:`heatmap_axes`'s
    ``xlabel``, ``ylabel``, ``colorbar`` and optionally ``vmin``, ``vmax``, ``cmap``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2.5 + min(0.7 * values.shape[1], 16), 1.6 + min(0.4 * values.shape[0], 12)),
                 layout="constrained")
    heatmap_axes(fig.add_subplot(), values, rows, columns, title, **labels)
    return fig


def heatmap_panels(
    panels: Mapping[str, torch.Tensor],
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    vmax: float | None = None,
    per_row: int = 4,
    **labels: Any,
) -> Any:
    """One labelled heatmap (R, C) per entry of ``panels`` (titled with its name), ``per_row`` side by side, on
    one colour scale (``vmax`` None: the largest finite value of any panel), under the overall ``title``.
    ``labels`` as in :func:`heatmap`."""
    from matplotlib.figure import Figure

    n_rows, n_cols = next(iter(panels.values())).shape
    across = min(per_row, len(panels))
    down = -(-len(panels) // across)
    if vmax is None:
        finite = [v[v.isfinite()] for v in panels.values()]
        vmax = max((float(v.max()) for v in finite if v.numel()), default=1.0)
    fig = Figure(figsize=(across * (2.5 + min(0.7 * n_cols, 16)), 0.4 + down * (1.6 + min(0.4 * n_rows, 12))),
                 layout="constrained")
    axes = fig.subplots(down, across, squeeze=False).flatten()
    for ax, (name, values) in zip(axes, panels.items(), strict=False):
        heatmap_axes(ax, values, rows, columns, str(name), vmax=vmax, **labels)
    for ax in axes[len(panels):]:
        ax.remove()  # an empty slot of the last row
    fig.suptitle(title)
    return fig


def heatmap_axes(
    ax: Any,
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
    """A labelled heatmap of ``values`` (R, C) drawn into the matplotlib axes ``ax`` (:func:`heatmap`'s figure,
    or one panel of :func:`heatmap_panels`'); returns the image."""
    import matplotlib
    import numpy as np

    values = values.detach().float().cpu()
    n_rows, n_cols = values.shape
    masked = np.ma.masked_invalid(values.numpy())
    colours = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    image = ax.imshow(masked, vmin=vmin, vmax=vmax, cmap=colours, aspect="auto")
    if n_rows * n_cols <= 150:
        lo, hi = image.get_clim()
        for r in range(n_rows):
            for c in range(n_cols):
                v = float(values[r, c])
                if not math.isfinite(v):
                    continue
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
    ax.figure.colorbar(image, ax=ax, label=colorbar)
    return image
