"""What the training benchmarks (``cache_vs_online.py``, ``loader.py``) share: the shapes experiment's config
at tiny or base size, their common command-line options, and running one row per size.

Not a benchmark itself; the scripts import it from their own folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["clip_tiny", "dino_tiny", "vit_tiny"]
BASE = ["clip", "dino", "vit"]


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every training benchmark takes: which sizes, the base runs' data, threads, Hydra overrides."""
    parser.add_argument("--base", action="store_true", help="also the base-size clip, dino, vit (random init)")
    parser.add_argument("--only-base", action="store_true")
    parser.add_argument("--base-images", type=int, default=24, help="shapes training images of the base runs")
    parser.add_argument("--base-batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache" / "bench" / "features")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the training process (default: torch's, one per core)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")


def shapes_config(encoders: Sequence[str], args: argparse.Namespace, out: Path, base: bool,
                  overrides: Sequence[str] = ()) -> DictConfig:
    """``+experiment=shapes`` with ``encoders``, the cache under ``--cache-dir``; small and random-init at base size."""
    common = [
        "+experiment=shapes",
        f"encoder=[{','.join(encoders)}]",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={out}",
        f"cache.dir={args.cache_dir}",
    ]
    if base:
        common += [f"encoder.{n}.pretrained=false" for n in encoders]
        common += [f"task.num_train={args.base_images}", "task.num_val=8", "task.num_test=8",
                   f"data.batch_size={args.base_batch_size}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*common, *overrides, *args.overrides])


def start(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and silence Lightning's per-run chatter (the tables are the output)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    # training_step's self.log() outside a Trainer warns and does nothing; each fit() prints its setup.
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel("ERROR")


def run_sizes(run: Callable[[str, list[str], argparse.Namespace, bool, Path], None], args: argparse.Namespace) -> None:
    """``run(size, encoders, args, base, out)`` for the tiny and/or base encoders, then the load average."""
    with tempfile.TemporaryDirectory() as out:
        if not args.only_base:
            run("tiny", TINY, args, False, Path(out))
        if args.base or args.only_base:
            run("base", BASE, args, True, Path(out))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
