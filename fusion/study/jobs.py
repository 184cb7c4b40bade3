"""Finding a sweep's jobs and what each one is: task, encoder subset, seed, VE-dropout, fusion strategy, head.

A job is a folder below the sweep with ``metrics.json`` and ``config_resolved.yaml`` (what ``train.py``
writes into every run folder). Everything the study groups by comes from the resolved config, never from
folder names, so any sweep (``train.py -m``, a SLURM array, jobs copied together by hand) is read alike.
Jobs of one *group* share task, VE-dropout, fusion strategy and head, and differ in encoder subset and seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusion.study.common import job_key, seed_key

__all__ = ["KEYS", "analysis_config", "best_checkpoint", "collect", "group_jobs", "retrained_reference", "subset_key"]

CONF = Path(__file__).resolve().parents[2] / "conf"
# Columns that describe a job, not a metric.
KEYS = ("group", "task", "subset", "size", "seed", "ve_dropout", "fusion", "head", "job")
# What a group is made of (beside the task, which always names it).
SETTINGS = ("ve_dropout", "fusion", "head")


def subset_key(subset: str) -> frozenset[str]:
    """A subset name ``a+b`` as a set (the order of the names in a config is not part of the subset)."""
    return frozenset(subset.split("+"))


def _short(target: Any) -> str | None:
    """``fusion.fusers.TokenConcatFuser`` -> ``TokenConcatFuser``."""
    return str(target).rsplit(".", 1)[-1] if target else None


def _task_name(config: DictConfig) -> str:
    """The task's ``name`` (vqav2, okvqa...), else its class without ``Task`` (ShapesTask -> shapes)."""
    name = OmegaConf.select(config, "task.name", default=None)
    if name:
        return str(name)
    target = _short(OmegaConf.select(config, "task._target_", default=None))
    return re.sub(r"Task$", "", target).lower() if target else "task"


def describe(config: DictConfig) -> dict[str, Any]:
    """The study's view of one resolved config: task, subset, size, seed, VE-dropout, fusion, head."""
    encoders = list(config.get("encoder") or {})
    dropout = OmegaConf.select(config, "training.ve_dropout", default=0.0)
    if isinstance(dropout, DictConfig):  # {name: p}: one label for the group
        dropout = ",".join(f"{k}={v}" for k, v in OmegaConf.to_container(dropout).items())
    return {
        "task": _task_name(config),
        "subset": "+".join(encoders),
        "size": len(encoders),
        "seed": config.get("seed"),
        "ve_dropout": dropout,
        "fusion": _short(OmegaConf.select(config, "fusion.fuser._target_", default=None)),
        "head": _short(OmegaConf.select(config, "training.head._target_", default=None)),
    }


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job below ``sweep_dir`` (any depth): :data:`KEYS` and every metric of its
    ``metrics.json``; ``job`` is the folder relative to the sweep. ``group`` names the job's group
    (:func:`group_jobs`): the task, plus each of VE-dropout / fusion / head that differs within the sweep.

    Sorted by group, then singles, pairs, ..., alphabetically within a size, then by seed.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"study: the sweep folder {str(sweep_dir)!r} does not exist")
    rows = []
    for metrics_path in sorted(sweep_dir.rglob("metrics.json")):
        job = metrics_path.parent
        if job == sweep_dir or any(p.name in ("leaning", "wandb", "study") for p in job.relative_to(sweep_dir).parents
                                   if p.name) or job.name in ("leaning", "encoder_ablation", "attention"):
            continue  # the study's own analysis folders, not jobs
        config_path = job / "config_resolved.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"study: {str(job)!r} has metrics.json but no config_resolved.yaml")
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"study: {str(metrics_path)!r} is not JSON ({e})") from None
        if not isinstance(metrics, dict):
            raise ValueError(f"study: {str(metrics_path)!r} should hold one object of metrics")
        info = describe(OmegaConf.load(config_path))
        if not info["subset"]:
            raise ValueError(f"study: {str(config_path)!r} has no encoder (key 'encoder' is empty)")
        rows.append({**info, "job": job.relative_to(sweep_dir).as_posix(), **metrics})
    _name_groups(rows)
    return sorted(rows, key=lambda r: (r["group"], r["size"], r["subset"], seed_key(r["seed"]), job_key(r["job"])))


def _name_groups(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``group``: its task, plus ``<setting>=<value>`` for each setting that varies within
    the task's jobs (one subset table per VE-dropout value when the sweep varies ``training.ve_dropout``)."""
    for task in {r["task"] for r in rows}:
        jobs = [r for r in rows if r["task"] == task]
        varying = [s for s in SETTINGS if len({str(r[s]) for r in jobs}) > 1]
        for r in jobs:
            r["group"] = "_".join([task, *(f"{s}={r[s]}" for s in varying)])


def group_jobs(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """:func:`collect`'s rows by ``group``, in their order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return groups


def retrained_reference(groups: dict[str, list[dict[str, Any]]], group: str) -> tuple[list[dict[str, Any]], str | None]:
    """The retrained side of ``group``'s retrain-vs-mask comparison: its own jobs, plus, for each subset it
    did not train, the jobs of the *reference* group that did, and that group's name (None: no job borrowed).

    The reference is the group of the same task, fusion and head with the most subsets (ties: the first).
    A sweep that trains every subset at the default VE-dropout and only the all-encoder model at other
    values (``training.ve_dropout=0,0.3``) thus compares each value's masked model with the same retrained
    subsets; what VE-dropout changes is then the masked side alone.
    """
    rows = groups[group]
    own = {subset_key(r["subset"]) for r in rows}
    same = [g for g, g_rows in groups.items() if g != group
            and all(g_rows[0][k] == rows[0][k] for k in ("task", "fusion", "head"))]
    if not same:
        return rows, None
    reference = max(same, key=lambda g: len({subset_key(r["subset"]) for r in groups[g]}))
    borrowed = [r for r in groups[reference] if subset_key(r["subset"]) not in own]
    return (rows + borrowed, reference) if borrowed else (rows, None)


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


def sweep_cwd(job: Path) -> Path:
    """The folder the job ran in (its ``.hydra/hydra.yaml``), else the current one: the configs' relative
    paths (``./cache``, ``./data``) are relative to it."""
    hydra_yaml = job / ".hydra" / "hydra.yaml"
    cwd = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.runtime.cwd") if hydra_yaml.is_file() else None
    return Path(cwd) if cwd else Path.cwd()


def analysis_config(job: str | Path, mode: str, stage: str, ckpt: Path, out: Path) -> DictConfig:
    """The config of ``eval.py mode=<mode>`` on a job's checkpoint: the job's ``config_resolved.yaml`` with
    conf/analysis/default.yaml, the split ``task.<stage>_split``, no loggers (no new wandb run per analysis)
    and the report folder ``out/<mode>``."""
    config = OmegaConf.load(Path(job) / "config_resolved.yaml")
    analysis = OmegaConf.load(CONF / "analysis" / "default.yaml")
    analysis.attention.split_by = "auto"  # answer types when the task has them
    split = OmegaConf.select(config, f"task.{stage}_split", default=stage)
    cfg = OmegaConf.merge(config, {"mode": mode, "ckpt_path": str(ckpt), "split": split, "analysis": analysis})
    # Not the job's own folder: an analysis writes its config_resolved.yaml into paths.output_dir.
    cfg.paths.output_dir = str(out)
    cfg.analysis.dir = str(out / mode)
    cfg.logger = None
    # An evaluation, as eval.py's own config names it: a folder recorded as a training run refuses a second
    # config, and the modes share <job>/leaning/ as their run folder.
    cfg.task_name = "eval"
    return cfg
