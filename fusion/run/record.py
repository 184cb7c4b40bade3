"""A run folder's record, ``config_resolved.yaml``: written once, never overwritten by another config.

A training run resumes in its folder (a requeued SLURM job, or the same command run again), so the record
must keep saying which config the folder's checkpoints were trained with. :func:`save_record` compares the
new resolved config with the folder's record *before* writing and refuses a different one, naming every
key that differs with both values; the same config (a resume) passes and the record stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import import_module
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fusion.data.distributed import is_rank_zero
from fusion.io import write_text

RECORD = "config_resolved.yaml"

# Keys that may differ between a run and its resume in the same folder without changing what is trained:
# which checkpoint a resume names (none for the folder's own), and where the command was launched from
# (root_dir, log_dir; the run folder itself and the data and cache folders are compared, resolved), and how
# often progress is logged. ``hydra`` is Hydra's own record (.hydra/), present only when composed with it.
IGNORED = frozenset({"ckpt_path", "paths.root_dir", "paths.log_dir", "callbacks.progress", "hydra"})


# The package restructure of December 2026 (#16): module -> its new home, and config groups renamed. A record
# written before it names the old ``_target_`` paths and the ``model`` group; :func:`upgrade_record` reads it
# in today's names, so a run folder of the old layout still resumes.
RENAMED_MODULES = {
    "fusion.encoders": "fusion.encoders.vision",
    "fusion.text": "fusion.encoders.text",
    "fusion.preprocess": "fusion.encoders.preprocess",
    "fusion.fusers.grid": "fusion.encoders.grid",
    "fusion.images": "fusion.data.images",
    "fusion.data": "fusion.data.module",
    "fusion.distributed": "fusion.data.distributed",
    "fusion.cache": "fusion.data.cache",
    "fusion.metrics": "fusion.metrics.accuracy",
    "fusion.tasks.vqa_metric": "fusion.metrics.vqa",
    "fusion.tasks.gqa_metric": "fusion.metrics.gqa",
    "fusion.tasks.binary_metrics": "fusion.metrics.binary",
    "fusion.ranking": "fusion.metrics.ranking",
    "fusion.model": "fusion.model.transformer",
    "fusion.attention": "fusion.model.attention",
    "fusion.heads": "fusion.model.heads",
    "fusion.dropout": "fusion.model.dropout",
    "fusion.stats": "fusion.monitoring.attention_stats",
    "fusion.fuser_weights": "fusion.monitoring.fuser_weights",
    "fusion.progress": "fusion.monitoring.progress",
    "fusion.lit": "fusion.training.module",
    "fusion.resume": "fusion.training.resume",
    "fusion.preempt": "fusion.training.preempt",
    "fusion.retrieval": "fusion.retrieval.dual_encoder",
    "fusion.retrieval_lit": "fusion.retrieval.module",
    "fusion.run": "fusion.run.commands",
    "fusion.record": "fusion.run.record",
    "fusion.cli": "fusion.run.cli",
    "fusion.collect": "fusion.sweeps.collect",
    "fusion.launch_check": "fusion.sweeps.launch_check",
}
RENAMED_KEYS = {"model": "training"}
STATISTICS_CALLBACKS = {
    "attention_stats": {"_target_": "fusion.monitoring.callbacks.AttentionStatsCallback"},
    "fuser_weights": {"_target_": "fusion.monitoring.callbacks.FuserWeightsCallback"},
}


def _renamed_target(value: str) -> str:
    module, _, attr = value.rpartition(".")
    try:  # today's name (or not ours): as it is
        getattr(import_module(module), attr)
        return value
    except (ImportError, AttributeError, ValueError):
        pass
    for old in sorted(RENAMED_MODULES, key=len, reverse=True):
        if value == old or value.startswith(old + "."):
            return RENAMED_MODULES[old] + value[len(old):]
    return value


def _with_optimizer_nodes(training: Any) -> Any:
    """A ``training`` node recorded before the optimiser and scheduler came from config, with the nodes that
    built the same AdamW and cosine schedule (from its ``lr``, ``weight_decay``, ``warmup_ratio``), placed after
    ``warmup_ratio`` as in conf/training/default.yaml (the comparison with today's config sees key order)."""
    if not isinstance(training, Mapping) or "optimizer" in training or "lr" not in training:
        return training
    nodes = {
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": training["lr"],
                      "weight_decay": training.get("weight_decay", 0.05)},
        "scheduler": {"_target_": "fusion.training.optim.cosine_with_warmup", "_partial_": True,
                      "warmup_ratio": training.get("warmup_ratio", 0.1)},
    }
    out: dict[str, Any] = {}
    for key, value in training.items():
        out[key] = value
        if key == "warmup_ratio":
            out.update(nodes)
    return out if "optimizer" in out else {**out, **nodes}


def _with_statistics_callbacks(callbacks: Mapping[str, Any]) -> dict[str, Any]:
    """``callbacks`` with the statistics callbacks where conf/callbacks/default.yaml lists them (before
    ``lr_monitor``; the order of a mapping's keys counts in a comparison)."""
    out: dict[str, Any] = {}
    for key, value in callbacks.items():
        if key == "lr_monitor":
            out.update({k: v for k, v in STATISTICS_CALLBACKS.items() if k not in callbacks})
        out[key] = value
    return {**out, **{k: v for k, v in STATISTICS_CALLBACKS.items() if k not in out}}


def upgrade_record(recorded: Any, top: bool = True) -> Any:
    """``recorded`` (a plain config) in today's names: renamed top-level groups, moved ``_target_`` modules,
    and the optimiser and scheduler nodes a record from before they existed stood for."""
    if isinstance(recorded, Mapping):
        upgraded = {
            (RENAMED_KEYS.get(k, k) if top else k): (
                _renamed_target(v) if k == "_target_" and isinstance(v, str) else upgrade_record(v, top=False)
            )
            for k, v in recorded.items()
        }
        if top and "training" in upgraded:
            upgraded["training"] = _with_optimizer_nodes(upgraded["training"])
        if top and "model" in recorded and isinstance(upgraded.get("callbacks"), Mapping):
            # Before the statistics moved into callbacks (#16), the module wrote them itself: a record of
            # that time stood for today's two statistics callbacks.
            upgraded["callbacks"] = _with_statistics_callbacks(upgraded["callbacks"])
        return upgraded
    if isinstance(recorded, list):
        return [upgrade_record(v, top=False) for v in recorded]
    return recorded


class RecordMismatch(ValueError):
    """The run folder already records another config."""


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 80 else text[:77] + "..."


def differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: recorded vs current`` for every dotted key whose value differs (a whole missing subtree once,
    as ``absent``; the order of a mapping's keys counts: the encoder list is built in that order), leaving
    out :data:`IGNORED`."""
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        def name(key: Any) -> str:
            return f"{prefix}.{key}" if prefix else str(key)

        out: list[str] = []
        for key in [*recorded, *(k for k in current if k not in recorded)]:
            if name(key) in IGNORED:
                continue
            if key not in current:
                out.append(f"{name(key)}: {_short(recorded[key])} vs absent")
            elif key not in recorded:
                out.append(f"{name(key)}: absent vs {_short(current[key])}")
            else:
                out.extend(differences(recorded[key], current[key], name(key)))
        before = [k for k in recorded if k in current and name(k) not in IGNORED]
        after = [k for k in current if k in recorded and name(k) not in IGNORED]
        if before != after:
            out.append(f"{prefix or '(top level)'}: order {before} vs {after}")
        return out
    return [] if recorded == current else [f"{prefix}: {_short(recorded)} vs {_short(current)}"]


def _as_plain(text: str, path: Path) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecordMismatch(
            f"{path} (this run folder's record of its config) is not readable YAML ({err}); a run folder's record "
            "is never overwritten: restore it, or train into another folder (hydra.run.dir=...)"
        ) from err


def check_record(cfg: DictConfig, output_dir: Path) -> str | None:
    """The resolved config as YAML to record in ``output_dir``, or None to keep the record there (a training
    run's, which this config resumes). Raises :class:`RecordMismatch` naming the differing keys when the folder
    holds a training run of another config (or when this is a training run and the folder holds another
    run's record)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = output_dir / RECORD
    if not path.is_file():
        return text
    recorded = _as_plain(path.read_text(), path)
    recorded = upgrade_record(recorded) if isinstance(recorded, dict) else {}
    # Evaluations may be run into their folder again with another split or checkpoint; a training folder's
    # record is what its checkpoints were trained with.
    if "train" not in (recorded.get("task_name"), cfg.get("task_name")):
        return text
    found = differences(recorded, _as_plain(text, path))
    if found:
        shown = "; ".join(found[:12]) + (f"; (+{len(found) - 12} more)" if len(found) > 12 else "")
        raise RecordMismatch(
            f"run folder {output_dir} already holds a run of another config (recorded in {path}, left unchanged); "
            f"recorded vs now: {shown}. Rerunning in a run folder resumes the run it holds, with the config it "
            "was started with: run the same command again to resume, or train into a new folder (without "
            f"hydra.run.dir=..., or another one), with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'} to "
            "start from its weights"
        )
    return None  # the record says what the run started with (a resume may name its checkpoint)


def save_record(cfg: DictConfig, output_dir: Path) -> None:
    """Check ``cfg`` against ``output_dir``'s record (:func:`check_record`, on every rank: all stop alike),
    then write it (rank 0) unless the folder's training record stays."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = check_record(cfg, output_dir)
    if text is not None and is_rank_zero():
        write_text(output_dir / RECORD, text)
