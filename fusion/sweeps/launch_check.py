"""Refuse bad SLURM launcher values before anything is submitted (a Hydra callback, conf/hydra/default.yaml).

sbatch would refuse them too, but only after the sweep started, in a submitit traceback; this names the
override to fix: a non-positive time limit, node, task, CPU or array count, or a partition that the
cluster (``sinfo``, where it is installed) does not have.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

POSITIVE = ("timeout_min", "nodes", "tasks_per_node", "cpus_per_task", "gpus_per_node", "mem_gb", "array_parallelism")


def partitions() -> list[str] | None:
    """The cluster's partitions, or None where ``sinfo`` is not installed or does not answer."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return None
    return sorted({line.strip().rstrip("*") for line in out.stdout.splitlines() if line.strip()})


_ASK_SINFO = object()


def launcher_errors(launcher: DictConfig | dict, known_partitions: Any = _ASK_SINFO) -> list[str]:
    """What is wrong with a submitit launcher config, one message per value.

    ``known_partitions``: the partitions a SLURM launcher may name (default: ask ``sinfo``; None: any).
    """
    errors = []
    for key in POSITIVE:
        value = launcher.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            errors.append(f"hydra.launcher.{key}={value!r} must be a positive whole number")
    delay = launcher.get("signal_delay_s")
    if delay is not None and (not isinstance(delay, int) or delay < 0):
        errors.append(f"hydra.launcher.signal_delay_s={delay!r} must be >= 0")
    partition = launcher.get("partition")
    if partition is not None and str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        known = partitions() if known_partitions is _ASK_SINFO else known_partitions
        if known is not None and str(partition) not in known:
            errors.append(
                f"hydra.launcher.partition={partition!r} is not a partition of this cluster: {', '.join(known)}"
            )
    return errors


class CheckLauncher(Callback):
    """Stops (exits) a multirun whose submitit launcher config has bad values, naming them."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = config.hydra.launcher
        if "submitit" not in str(launcher.get("_target_", "")):
            return
        errors = launcher_errors(launcher)
        if errors:
            # SystemExit: Hydra turns a callback's exceptions into warnings and goes on.
            sys.exit("error: bad SLURM launcher settings:\n  " + "\n  ".join(errors))
