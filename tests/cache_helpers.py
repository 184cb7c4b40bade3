"""Shared pieces of the feature-cache tests (imported by them, not a test file), and a worker script.

As a script it builds a cache in a fresh process, for the tests that need real separate processes:

    python tests/cache_helpers.py <root> <images.json> [--slow S] [--record FILE] [--kill-after ROWS]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from fusion.data.images import load_image
from fusion.encoders.vision import TimmEncoder

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "encoder"


def tiny_encoder(name: str = "clip_tiny", **overrides) -> TimmEncoder:
    """A tiny encoder exactly as ``conf/encoder/<name>.yaml`` builds it, with field overrides."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml")[name])
    cfg.pop("_target_")
    return TimmEncoder(**{**cfg, **overrides})


def make_images(folder: Path, n: int = 7, seed: int = 0) -> dict[str, Path]:
    """``n`` random PNGs of varying sizes, keyed like a task does (``set/<id>``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(n):
        h, w = 24 + 8 * (i % 3), 40 - 4 * (i % 4)
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images[f"set/{i:03d}"] = path
    return images


def online(encoder: TimmEncoder, images: dict[str, Path], keys: list[str]) -> torch.Tensor:
    """``(B, T, D)`` features of ``keys`` computed now, through the training path's decode + transform."""
    tf = encoder.preprocess.transform()
    return encoder(torch.stack([tf(load_image(images[k])) for k in keys]))


def write_images_json(images: dict[str, Path], path: Path) -> Path:
    path.write_text(json.dumps({k: str(v) for k, v in images.items()}))
    return path


def run_worker(root: Path, images_json: Path, *args: str, wait: bool = True) -> subprocess.Popen:
    """Start this file as a script in a new process (``wait``: and wait for it)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, str(root), str(images_json), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    if wait:
        proc.wait(timeout=120)
    return proc


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m fusion.data.cache <args>`` in a new process, from the repository, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fusion.data.cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def _main() -> None:
    from fusion.data.cache import ensure_cache

    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("images")
    parser.add_argument("--slow", type=float, default=0.0, help="sleep per batch, so two builds overlap")
    parser.add_argument("--record", help="append this process's pid here when it encodes a batch")
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL self once this many rows are done")
    args = parser.parse_args()
    images = {k: Path(v) for k, v in json.loads(Path(args.images).read_text()).items()}

    def on_batch(rows: int) -> None:
        if args.record:
            with open(args.record, "a") as f:
                f.write(f"{os.getpid()}\n")
        if args.kill_after is not None and rows >= args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.slow)

    cache = ensure_cache(
        tiny_encoder(), images, args.root, dtype="float32", batch_size=2, num_workers=0, progress=False,
        sync_every=0.0, on_batch=on_batch,
    )
    print(json.dumps({"path": str(cache.path), "rows": len(cache)}))


if __name__ == "__main__":
    _main()
