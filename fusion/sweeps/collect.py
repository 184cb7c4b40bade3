"""The results of a sweep in one place: ``python eval.py mode=collect sweep_dir=<multirun folder>``.

Every element of a sweep (a Hydra job folder, found by its ``.hydra/``) that finished holds a
``metrics.json``. This gathers them into

- ``results.csv``: one row per element (job, status, task, encoders, seed, overrides, every metric),
- ``results.md``: the table the paper's main table gives, task x encoder subset (mean ± std over seeds),
  then the failed elements,
- ``results.png``: that table as a heatmap,

and reports the elements that failed, with the reason read from their logs (the job's own ``*.log``, or
the submitit / SLURM output of its array task), instead of stopping at the first one.

Which launcher log belongs to which element:

- submitit (``hydra/launcher=slurm|local``): the element's ``.hydra/hydra.yaml`` records its submitit job
  id (``hydra.job.id``, ``<array job>_<index>``), the name of its folder in ``<sweep>/.submitit/``. The
  job number is not enough: a sweep launched in several batches (Optuna's ``n_jobs`` trials at a time) is
  one array per batch, whose indices restart at 0 while the job numbers go on. A submitit task that left
  no element folder at all (it failed before Hydra started the job) gets a row of its own.
- ``slurm/array.sbatch``: the element's folder ``<sweep>/<index>/`` is made before the job starts, with
  ``slurm_overrides.txt`` (the element's overrides) and ``slurm.out``, a link to SLURM's output of that
  array task; an element that failed before Hydra wrote ``.hydra/`` (e.g. a bad override on its line of
  the sweep file) is still a row, with the reason from that output.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusion.io import save_figure, write_text
from fusion.io import write_csv as write_rows

log = logging.getLogger(__name__)

# The last line of a Python traceback ("ValueError: ..."), what SLURM writes when it kills a job, or the
# entry points' own command-line check ("error: unknown encoder ...").
ERROR_LINE = re.compile(
    r"^(\w+\.)*\w*(Error|Exception|Interrupt|Exit)\b.*|.*\*\*\* JOB .* CANCELLED.*|.*Killed.*|^error: .*"
)
# Hydra ends a config error (no traceback) with this line; the message is the paragraph before it, whose
# first line is usually one of these.
HYDRA_ERROR_END = "Set the environment variable HYDRA_FULL_ERROR=1"
HYDRA_ERROR_START = ("Could not", "In '", "Error ", "Missing mandatory value", "Key '", "Interpolation", "Ambiguous")
# slurm/array.sbatch writes it into an element's folder before the element starts.
ARRAY_MARKER = "slurm_overrides.txt"


@dataclass
class Element:
    """One job of a sweep: where it ran, what it was, and what it gave (or why it gave nothing)."""

    path: Path
    job: str
    task: str
    encoders: str
    seed: Any
    overrides: list[str]
    monitor: str | None
    # The submitit job id (``<array job>_<index>``) the element ran as, if it ran through submitit.
    launcher_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _load_yaml(path: Path) -> DictConfig | None:
    try:
        return OmegaConf.load(path) if path.is_file() else None
    except Exception:  # a half-written or foreign file: the element still gets a row
        return None


def find_elements(sweep_dir: Path) -> list[Path]:
    """Job folders below ``sweep_dir`` (any depth), in job-number order where the names are numbers: those
    Hydra made (``.hydra/``), and those ``slurm/array.sbatch`` made for an element before it started."""
    folders = {p.parent.parent for p in sweep_dir.rglob(".hydra/config.yaml")}
    folders |= {p.parent for p in sweep_dir.rglob(ARRAY_MARKER) if ".submitit" not in p.parts}

    def order(p: Path) -> tuple:
        rel = p.relative_to(sweep_dir).parts
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in rel)

    return sorted(folders, key=order)


def _hydra_error(lines: list[str]) -> str | None:
    """The first line of the message of Hydra's last config error (Hydra prints no traceback for those)."""
    ends = [i for i, line in enumerate(lines) if line.strip().startswith(HYDRA_ERROR_END)]
    if not ends:
        return None
    paragraphs: list[list[str]] = [[]]
    for line in lines[: ends[-1]]:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    for paragraph in reversed([p for p in paragraphs if p]):
        if paragraph[0].startswith("Available options"):  # the list after "Could not find 'x/y'"
            continue
        # Not the lines printed before the error without a blank line between (e.g. array.sbatch's echo).
        starts = [line for line in paragraph if line.startswith(HYDRA_ERROR_START)]
        return f"Hydra: {starts[0] if starts else paragraph[-1]}"
    return None


def _last_error(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return errors[-1] if errors else _hydra_error(text.splitlines())


def submitit_tasks(sweep_dir: Path) -> dict[str, list[Path]]:
    """submitit's log files (stderr first) per job id, from ``<sweep>/.submitit/<job id>/``: the folders of
    submitted jobs (``<id>_submitted.pkl``, or logs), not an array's own folder (its submission script only)
    nor the empty ``%j`` one."""
    root = sweep_dir / ".submitit"
    if not root.is_dir():
        return {}

    def is_job(d: Path) -> bool:
        name = glob.escape(d.name)
        return d.is_dir() and (any(d.glob(f"{name}_submitted.pkl")) or any(d.glob(f"{name}_*_log.*")))

    jobs = [d for d in sorted(root.iterdir()) if is_job(d)]
    return {d.name: sorted(d.glob("*_log.err")) + sorted(d.glob("*_log.out")) for d in jobs}


def _reason_from(paths: list[Path], sweep_dir: Path) -> str | None:
    for path in paths:
        try:
            reason = _last_error(path.read_text(errors="replace"))
        except OSError:  # e.g. slurm.out linking to an output file deleted since
            continue
        if reason:
            return f"{reason} ({path.relative_to(sweep_dir) if path.is_relative_to(sweep_dir) else path})"
    return None


def failure_reason(job_dir: Path, sweep_dir: Path, launcher_logs: list[Path] = ()) -> str:
    """Why a job left no metrics.json: the last error in its own logs (with ``slurm/array.sbatch``,
    ``slurm.out`` is SLURM's output of the array task), else in its submitit task's logs."""
    own = sorted(job_dir.glob("*.log")) + sorted(job_dir.glob("*.err")) + sorted(job_dir.glob("*.out"))
    reason = _reason_from(own + list(launcher_logs), sweep_dir)
    if reason:
        return reason
    if (job_dir / "checkpoints").is_dir():
        return "no metrics.json and no error in its logs: still running, or killed (time limit, memory, node)"
    return "no metrics.json and no error in its logs: it never started training (pending, or killed at start)"


def _from_overrides(overrides: list[str]) -> tuple[str | None, list[str]]:
    """Task and encoders named by an element's overrides (for an element Hydra never composed)."""
    values = {}
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        values[key] = value
    task = values.get("task") or values.get("experiment")
    encoders = [e.strip() for e in values.get("encoder", "").strip("[]").split(",") if e.strip()]
    return task, encoders


def _job_id(hydra: DictConfig | None) -> str | None:
    try:
        value = OmegaConf.select(hydra, "hydra.job.id", default=None) if hydra is not None else None
    except Exception:  # "???" (not set by the launcher)
        return None
    return str(value) if value is not None else None


def read_element(job_dir: Path, sweep_dir: Path, launcher_logs: list[Path] = ()) -> Element:
    cfg = _load_yaml(job_dir / "config_resolved.yaml") or _load_yaml(job_dir / ".hydra" / "config.yaml")
    hydra = _load_yaml(job_dir / ".hydra" / "hydra.yaml")
    overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml")
    if overrides is None and (job_dir / ARRAY_MARKER).is_file():  # array.sbatch: Hydra never got this far
        overrides = (job_dir / ARRAY_MARKER).read_text().splitlines()
    overrides = [str(o) for o in (overrides or [])]
    choices = OmegaConf.select(hydra, "hydra.runtime.choices", default=None) if hydra is not None else None
    encoders = list((cfg.get("encoder") or {}).keys()) if cfg is not None else []
    task = (choices or {}).get("task") or (OmegaConf.select(cfg, "experiment_name", default=None) if cfg else None)
    if cfg is None:
        task, encoders = _from_overrides(overrides)
    element = Element(
        path=job_dir,
        job=str(job_dir.relative_to(sweep_dir)),
        task=str(task or "?"),
        encoders="+".join(encoders) or "?",
        seed=OmegaConf.select(cfg, "seed", default=None) if cfg is not None else None,
        overrides=overrides,
        monitor=OmegaConf.select(cfg, "monitor.metric", default=None, throw_on_missing=False) if cfg else None,
        launcher_id=_job_id(hydra),
    )
    metrics_file = job_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            element.metrics = {k: float(v) for k, v in json.loads(metrics_file.read_text()).items()}
        except (ValueError, AttributeError) as err:
            element.error = f"unreadable metrics.json: {err}"
    else:
        element.error = failure_reason(job_dir, sweep_dir, launcher_logs)
    return element


def read_elements(sweep_dir: Path) -> list[Element]:
    """Every element of the sweep, matched to its submitit task; tasks that left no folder are rows too."""
    tasks = submitit_tasks(sweep_dir)
    folders = find_elements(sweep_dir)
    ids = {f: _job_id(_load_yaml(f / ".hydra" / "hydra.yaml")) for f in folders}
    claimed = {i for i in ids.values() if i in tasks}

    def task_of(folder: Path) -> str | None:
        if ids[folder] in tasks:
            return ids[folder]
        # No id recorded: the task whose array index is the folder's job number, if exactly one is (a sweep
        # that went out as one array); a sweep of several arrays (batches) repeats the indices.
        candidates = [t for t in tasks if t not in claimed and t.rsplit("_", 1)[-1] == folder.name]
        return candidates[0] if len(candidates) == 1 else None

    matched = {f: task_of(f) for f in folders}
    elements = [read_element(f, sweep_dir, tasks.get(matched[f]) or []) for f in folders]
    for e, f in zip(elements, folders, strict=True):
        e.launcher_id = matched[f]
    for task_id in sorted(set(tasks) - set(matched.values())):
        reason = _reason_from(tasks[task_id], sweep_dir)
        elements.append(
            Element(
                path=sweep_dir / ".submitit" / task_id, job=f".submitit/{task_id}", task="?", encoders="?",
                seed=None, overrides=[], monitor=None, launcher_id=task_id,
                error=reason or "submitit job without an element folder: pending, or it failed before Hydra "
                "started the job (no error in its logs)",
            )
        )
    return elements


def headline(element: Element, metric: str | None) -> str | None:
    """The metric to tabulate: ``metric`` if given, else the element's monitored metric on test, else on val."""
    if metric:
        return metric
    if element.monitor is None:
        return None
    name = element.monitor.split("/", 1)[-1]
    return f"test/{name}" if f"test/{name}" in element.metrics else element.monitor


def pivot(elements: list[Element], metric: str | None) -> tuple[list[str], list[str], dict[tuple[str, str], list]]:
    """Tasks (rows), encoder subsets (columns, by size then name) and the values of each cell (one per seed)."""
    cells: dict[tuple[str, str], list[float]] = {}
    for e in elements:
        name = headline(e, metric)
        if e.ok and name in e.metrics:
            cells.setdefault((e.task, e.encoders), []).append(e.metrics[name])
    # Every element's task and subset, finished or not: a failed cell shows as failed, not as a gap (an
    # element of unknown task and subset, e.g. a submitit job that never started, is only in the failed list).
    known = [e for e in elements if (e.task, e.encoders) != ("?", "?")]
    tasks = sorted({e.task for e in known})
    subsets = sorted({e.encoders for e in known}, key=lambda s: (s.count("+"), s))
    return tasks, subsets, cells


def _cell(values: list[float] | None, failed: int) -> str:
    note = f" ({failed} failed)" if failed and values else ""
    if not values:
        return f"failed ({failed})" if failed else "–"
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.4f} (n={len(values)})" if len(values) > 1 else ""
    return f"{mean:.4f}{spread}{note}"


def write_csv(elements: list[Element], path: Path) -> None:
    """``results.csv``: one row per element, every metric any element logged as a column."""
    metric_names = sorted({k for e in elements for k in e.metrics})
    header = ["job", "status", "task", "encoders", "seed", "overrides", "launcher_id", *metric_names, "error"]
    write_rows(path, [header, *(
        [e.job, "ok" if e.ok else "failed", e.task, e.encoders, e.seed, " ".join(e.overrides),
         e.launcher_id or "", *[e.metrics.get(k, "") for k in metric_names], e.error or ""]
        for e in elements
    )])


def markdown(elements: list[Element], metric: str | None) -> str:
    tasks, subsets, cells = pivot(elements, metric)
    names = sorted({headline(e, metric) or "?" for e in elements if e.ok})
    lines = [f"# Sweep results: {sum(e.ok for e in elements)} of {len(elements)} elements finished", ""]
    lines.append(f"Metric: {', '.join(names) or '–'} (mean ± std over seeds where there are several)")
    lines.append("")
    if tasks:
        lines.append("| task | " + " | ".join(subsets) + " |")
        lines.append("|---|" + "---|" * len(subsets))
        for t in tasks:
            row = [_cell(cells.get((t, s)), sum(not e.ok and (e.task, e.encoders) == (t, s) for e in elements))
                   for s in subsets]
            lines.append(f"| {t} | " + " | ".join(row) + " |")
        lines.append("")
    failed = [e for e in elements if not e.ok]
    if failed:
        common = set.intersection(*(set(e.overrides) for e in elements))
        lines += ["## Failed elements", "", "| job | task | encoders | overrides (of this element) | reason |",
                  "|---|---|---|---|---|"]
        for e in failed:
            reason = (e.error or "").replace("|", "\\|")
            own = " ".join(o for o in e.overrides if o not in common)
            lines.append(f"| {e.job} | {e.task} | {e.encoders} | {own} | {reason} |")
        lines.append("")
    return "\n".join(lines)


def plot(elements: list[Element], metric: str | None, path: Path) -> bool:
    """Heatmap task x encoder subset of the mean metric; False when there is nothing to plot."""
    tasks, subsets, cells = pivot(elements, metric)
    if not cells:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[statistics.fmean(cells[(t, s)]) if (t, s) in cells else math.nan for s in subsets]
                       for t in tasks])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(subsets), 1.2 + 0.6 * len(tasks)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(subsets)), [s.replace("+", "+\n") for s in subsets], fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(subsets)):
            if not math.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    names = sorted({headline(e, metric) or "?" for e in elements if e.ok})
    ax.set_title(f"{', '.join(names)} by task and encoder subset", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return True


def collect(sweep_dir: str | Path, out_dir: str | Path | None = None, metric: str | None = None) -> list[Element]:
    """Gather a sweep's elements into results.csv / .md / .png in ``out_dir`` (default: the sweep folder)."""
    sweep = Path(str(sweep_dir)).expanduser()
    if not sweep.is_dir():
        raise FileNotFoundError(f"sweep_dir={str(sweep_dir)!r} is not a folder")
    elements = read_elements(sweep)
    if not elements:
        raise FileNotFoundError(f"no sweep elements (folders with .hydra/config.yaml) below {sweep}")
    out = Path(str(out_dir)).expanduser() if out_dir else sweep
    out.mkdir(parents=True, exist_ok=True)
    write_csv(elements, out / "results.csv")
    write_text(out / "results.md", markdown(elements, metric))
    plot(elements, metric, out / "results.png")
    for e in elements:
        if not e.ok:
            log.error("sweep element %s (%s, %s) failed: %s", e.job, e.task, e.encoders, e.error)
    log.info("%d of %d elements finished; tables in %s", sum(e.ok for e in elements), len(elements), out)
    return elements


def collect_from_config(cfg: DictConfig) -> list[Element]:
    """``eval.py mode=collect sweep_dir=<folder> [collect_dir=<folder>] [collect_metric=test/acc]``."""
    if not cfg.get("sweep_dir"):
        raise ValueError("mode=collect needs sweep_dir=<a multirun folder>, e.g. logs/train/multiruns/<time>")
    return collect(cfg.sweep_dir, cfg.get("collect_dir"), cfg.get("collect_metric"))
