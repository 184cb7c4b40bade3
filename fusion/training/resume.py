"""Exact resume: a run stopped anywhere and resumed from its last checkpoint trains on as if never stopped.

Lightning restores weights, optimiser, scheduler, loop counters and callbacks, but not where the training
loader was within its epoch nor the random number generators. Here:

- :class:`fusion.data.samplers.ResumableSampler` orders epoch ``e`` by ``(seed, e)`` alone and can start
  partway through an epoch; the data module saves where the loader stands in every checkpoint.
- :class:`RestoreRNG` saves the torch / numpy / Python RNG states in every checkpoint and puts them back
  when the resumed run's training starts (after the sanity check, which draws from them too).
- :func:`resume_path` finds what to resume from: ``ckpt_path`` if given, else the readable checkpoint with the
  most steps already in this run's folder, of any kind (a requeued SLURM job runs again in the same folder).
- :func:`load_checkpoint` reads a checkpoint or stops with one error naming the path, what the file is (text,
  cut short, another torch file) and what was expected.
- :func:`check_compatible` refuses a checkpoint of another model before Lightning tries to load it, naming
  the parameters that are missing, unexpected or of another shape.
"""

from __future__ import annotations

import logging
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)

# Lightning writes these into default_root_dir (= the run folder) when SLURM signals a requeue.
HPC_PATTERN = "hpc_ckpt_*.ckpt"


def rng_states() -> dict[str, Any]:
    """The global RNG states, as plain containers and tensors (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RestoreRNG(pl.Callback):
    """Saves the RNG states in every checkpoint; a run resumed from one gets them back as training starts."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not at load time: the sanity check and the loaders' set-up that follow it draw from the RNGs.
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


class CheckpointError(ValueError):
    """A file given or found as a checkpoint that is not one (text, cut short, another kind of torch file)."""


# What every Lightning checkpoint holds (Trainer.save_checkpoint); train.py's also hold the model's hyperparameters.
CHECKPOINT_KEYS = ("state_dict", "global_step", "pytorch-lightning_version")
EXPECTED = "expected a Lightning checkpoint written by train.py (<run>/checkpoints/*.ckpt)"


def load_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path``, read on the CPU (memory-mapped); else one :class:`CheckpointError` (a
    FileNotFoundError for a missing path) naming ``option``, the path, what it is and what was expected."""
    path = Path(str(path)).expanduser()
    where = f"{option}={str(path)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist; {EXPECTED}")
    if not path.is_file():
        raise CheckpointError(f"{where} is a folder, not a file; {EXPECTED}")
    with path.open("rb") as f:
        head = f.read(512)
    # torch.save writes a zip archive; a Lightning checkpoint is never anything else.
    if not zipfile.is_zipfile(path):
        if not head:
            what = "is empty"
        elif head.startswith(b"PK"):
            what = f"is a zip archive cut short ({path.stat().st_size} bytes, no central directory: truncated, or " \
                   "still being written)"
        elif b"\0" not in head and _is_text(head):
            first = head.decode("utf-8", errors="replace").strip().splitlines()[0][:60]
            what = f"is a text file (it begins {first!r})"
        else:
            what = f"is not a zip archive as torch.save writes ({path.stat().st_size} bytes beginning {head[:8]!r})"
        raise CheckpointError(f"{where} {what}; {EXPECTED}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever torch says, the user needs the path first
        raise CheckpointError(
            f"{where} cannot be read by torch.load (damaged?): {type(err).__name__}: {err}; {EXPECTED}"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where} is a torch file holding a {type(ckpt).__name__}, not a checkpoint; {EXPECTED}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        keys = ", ".join(map(str, list(ckpt)[:8])) + (", ..." if len(ckpt) > 8 else "")
        raise CheckpointError(
            f"{where} is a torch file but not a Lightning checkpoint: it lacks {missing} (its keys: {keys or 'none'}); "
            f"{EXPECTED}"
        )
    return ckpt


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:  # a multi-byte character cut at the 512th byte is still text
        return err.start >= len(head) - 3
    return True


def checkpoint_step(path: Path) -> int:
    """The checkpoint's step; -1, with a warning, for a file that is not a readable checkpoint (Lightning
    writes checkpoints atomically, but a file copied in or cut short by a full disk may be anything), so
    that resuming takes the next newest instead of failing."""
    try:
        return int(load_checkpoint(path, option="checkpoint")["global_step"])
    except (CheckpointError, OSError) as err:
        log.warning("not resuming from %s: %s", path, err)
        return -1


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Every checkpoint a run folder holds: ``checkpoints/*.ckpt`` (last.ckpt, last_step.ckpt, the requeue's
    last_requeue.ckpt, the best epoch_NNN.ckpt) and Lightning's hpc_ckpt_*.ckpt."""
    return sorted([*run_dir.glob(HPC_PATTERN), *(run_dir / "checkpoints").glob("*.ckpt")])


def resume_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """``ckpt_path`` if given (it must be a readable checkpoint); else the run folder's readable checkpoint
    with the most steps (a requeued job's own), of any kind: with last.ckpt unreadable, the best
    epoch_NNN.ckpt still saves the run from starting over."""
    if ckpt_path is not None:
        path = Path(str(ckpt_path)).expanduser()
        load_checkpoint(path)
        return path
    steps = {p: checkpoint_step(p) for p in run_checkpoints(run_dir)}
    found = [p for p, step in steps.items() if step >= 0]
    if not found:
        return None
    # On a tie the requeue checkpoint wins: it holds the exact mid-epoch loop state, while the last.ckpt
    # Lightning writes as training stops for the requeue (same step, written later) marks the epoch as done.
    # Then last*.ckpt over a best epoch_NNN.ckpt of the same step (the same state; last is what a user expects).
    return max(
        found, key=lambda p: (steps[p], p.name == "last_requeue.ckpt", p.name.startswith("last"), p.stat().st_mtime)
    )


def check_compatible(path: Path, model: torch.nn.Module, skip_prefix: str = "encoders.") -> None:
    """Refuse a checkpoint whose parameters do not fit ``model``, naming every key that differs. Keys the
    model leaves out of its checkpoints (``model.unsaved_keys()``: frozen encoders, a frozen LM; else those
    under ``skip_prefix``) are not compared."""
    saved = load_checkpoint(path)["state_dict"]
    unsaved = getattr(model, "unsaved_keys", None)
    skip = unsaved() if unsaved is not None else set()

    def compared(key: str) -> bool:
        return not key.startswith(skip_prefix) and key not in skip

    current = {k: v for k, v in model.state_dict().items() if compared(k)}
    saved = {k: v for k, v in saved.items() if compared(k)}
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    shapes = sorted(
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(current[k].shape)}"
        for k in set(saved) & set(current)
        if tuple(saved[k].shape) != tuple(current[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("shape differs", shapes), ("missing from the checkpoint", missing),
                        ("not in the model", unexpected)):
        if keys:
            more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
            parts.append(f"{label}: {', '.join(keys[:8])}{more}")
    raise ValueError(
        f"checkpoint {path} was written by a model of another configuration; " + "; ".join(parts)
        + ". Resume with the config it was trained with (its run folder's config_resolved.yaml)."
    )
