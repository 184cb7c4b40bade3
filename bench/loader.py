"""Cached samples/s delivered by the DataLoader vs the model's training-step rate on the same batches.

    python bench/loader.py                  # tiny encoders (shapes experiment), 100 batches of 64, 2 workers
    python bench/loader.py --base           # + base-size CLIP/DINO/ViT caches (random init), batches of 8
    python bench/loader.py --workers 1 --batches 50 fusion=resampler

With ``cache.enabled=true`` the training loader of the real :class:`fusion.data.module.FusionDataModule`
(``--workers`` persistent workers; each batch: tokenize the questions, gather every encoder's cached
rows in one read per batch) is drained for ``--batches`` batches with nothing else running: the rate it
can deliver. The first pass also keeps those batches in memory; the training step of
:class:`fusion.training.module.FusionLitModule` (``training_step`` + backward + gradient clipping + foreach AdamW,
as ``conf/trainer`` and ``configure_optimizers`` set them up) then runs over exactly those batches,
with no loading: the rate the model consumes them. The loader must deliver at least 5x what the step
consumes, so it is never the bottleneck. Loader and step passes alternate ``--repeats`` times; medians.

``--readers pread memmap`` also drains the loader with the previous reader (``np.take`` from an
``np.memmap`` of the whole file) patched into :meth:`FeatureCache.get`, for comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_setup import add_size_arguments, run_sizes, shapes_config, start  # noqa: E402

from fusion.data.cache.store import FeatureCache  # noqa: E402
from fusion.run.commands import build  # noqa: E402


@contextlib.contextmanager
def reader(name: str) -> Iterator[None]:
    """``pread``: the package's reader; ``memmap``: the previous one, patched in for the duration."""
    if name == "pread":
        yield
        return
    original = FeatureCache.get

    def get(self: FeatureCache, keys, dtype=None):  # noqa: ANN001
        out = torch.from_numpy(np.take(self.array(), self.rows(keys), axis=0))
        return out if dtype is None else out.to(dtype)

    FeatureCache.get = get
    try:
        yield
    finally:
        FeatureCache.get = original


def drain(loader, batches: int, keep: bool = False) -> tuple[float, list]:
    """Samples/s of the first ``batches`` batches of a fresh pass over ``loader`` (and the batches if ``keep``)."""
    kept, samples = [], 0
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        samples += int(batch["labels"].shape[0])
        if keep:
            kept.append(batch)
        if i + 1 == batches:
            break
    return samples / (time.perf_counter() - start), kept


def step_rate(model, batches: list, clip: float | None, warmup: int = 3) -> float:
    """Samples/s of full training steps (forward, loss, backward, clipping, AdamW) over ``batches``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step(i: int, batch) -> None:  # noqa: ANN001
        loss = model.training_step(batch, i)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for i, batch in enumerate(batches[:warmup]):
        step(i, batch)
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        step(i, batch)
    return sum(int(b["labels"].shape[0]) for b in batches) / (time.perf_counter() - start)


def run(name: str, encoders: list[str], args: argparse.Namespace, base: bool, out: Path) -> None:
    batches = args.batches or (12 if base else 100)
    cfg = shapes_config(encoders, args, out, base, ["cache.enabled=true", f"data.num_workers={args.workers}"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, model = build(cfg)
    datamodule.prepare_data()  # builds the caches on first use, outside the timing
    datamodule.setup("fit")
    clip = cfg.trainer.get("gradient_clip_val")
    loaders = {r: None for r in args.readers}
    steps, delivered = [], {r: [] for r in args.readers}
    kept: list = []
    for _ in range(args.repeats):
        for r in args.readers:
            with reader(r):
                if loaders[r] is None:  # workers fork (with the reader in place) at the first pass
                    loaders[r] = datamodule.train_dataloader()
                    _, first = drain(loaders[r], batches, keep=not kept)  # warm-up pass
                    kept = kept or first
                delivered[r].append(drain(loaders[r], batches)[0])
        steps.append(step_rate(model, kept, clip))
    step = statistics.median(steps)
    tokens = " + ".join(str(e.num_tokens) for e in model.encoders.values())
    for r in args.readers:
        rate = statistics.median(delivered[r])
        ratio = rate / step
        print(f"{name:<5} {tokens:>15} {cfg.data.batch_size:>5} {len(kept):>7} {r:>6} {rate:>13.0f} {step:>11.0f} "
              f"{ratio:>11.1f}  {'ok (>= 5x)' if ratio >= 5 else 'LOADER TOO SLOW (< 5x)'}   per repeat "
              f"{' '.join(f'{d / s:.1f}' for d, s in zip(delivered[r], steps, strict=True))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=None, help="batches per pass (default 100 tiny, 12 base)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readers", nargs="+", default=["pread"], choices=["pread", "memmap"])
    add_size_arguments(parser)
    args = parser.parse_args()
    start(args)
    print(f"{args.workers} loader workers, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"repeats {args.repeats} (medians), load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'size':<5} {'tokens':>15} {'batch':>5} {'batches':>7} {'reader':>6} {'loader smp/s':>13} "
          f"{'step smp/s':>11} {'loader/step':>11}")
    run_sizes(run, args)


if __name__ == "__main__":
    main()
