"""What each feature-cache storage costs and gives: bytes, build, read and step rates, and accuracy.

    python bench/cache_storage.py                        # tiny encoders, every measure, 3 seeds
    python bench/cache_storage.py --base                 # + base-size clip/dino/vit (random init): no accuracy
    python bench/cache_storage.py --seeds 1 --acc-epochs 2 --acc-storages float16 int8/16   # a shorter accuracy run
    python bench/cache_storage.py --accuracy-only --acc-storages float16 int8 int8/4 task.num_train=1000
    python bench/cache_storage.py --base --threads 1 --acc-jobs 2   # the full table on 2 cores (about 2 h)

Storages (rows): ``--dtypes`` (float16, int8 by default; float32, float8_e4m3fn possible) x pooling
(full, then each K of ``--pool``, base size, or ``--tiny-pool``, tiny encoders: their grids are 4 x 4 and
6 x 6, so 49 does not fit them; a K larger than an encoder's grid is skipped). For each storage and size,
in one process on the shapes experiment (``+experiment=shapes``, the caches under ``--cache-dir``):

- ``B/img``: feature bytes per image on disk, all encoders (rows + int8 scales; ``x f16``: vs float16 full);
- ``build img/s``: images per second of :func:`fusion.data.cache.build_cache` for every encoder in turn
  (``--force``d: decode, transform, encode, pool, quantise, write, publish; 2 DataLoader workers);
- ``read smp/s``: training samples per second out of the training DataLoader (``data.num_workers=2``,
  the collator reading and dequantising the cached rows; the files in the page cache), over
  ``--read-epochs`` epochs after the first batch;
- ``step smp/s``: samples per second of Lightning training steps (``fusion.tokens_per_encoder`` = the
  cache's K; from the same initial weights), the timing of ``cache_vs_online.py``;
- ``test acc`` (tiny encoders only, storages in ``--acc-storages``): test accuracy of ``train.py
  +experiment=shapes`` trained through ``cache.enabled=true`` with that storage and the zoo towers
  (``--zoo-dir``; pretrained first by ``train.py +experiment=zoo/all`` if missing, ``--pretrain-steps``
  per tower), mean +- std over ``--seeds`` seeds, ``--acc-epochs`` epochs (the experiment's 8 unless
  given: the output says when it is fewer); ``--acc-jobs`` storages train side by side, each its seeds in
  turn (``train.py`` children get ``--threads`` torch threads), after the timed rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cache_vs_online import fit  # noqa: E402
from training_setup import BASE, TINY, add_size_arguments, shapes_config, start  # noqa: E402

from fusion.data.cache import build_cache, images_of  # noqa: E402
from fusion.run.commands import build  # noqa: E402


def storage_name(dtype: str, k: int | None) -> str:
    return dtype if k is None else f"{dtype}/{k}"


def fits(model, k: int | None) -> bool:  # noqa: ANN001
    """Every encoder's patch grid holds at least K patches."""
    return k is None or all(e.num_tokens - e.num_prefix_tokens >= k for e in model.encoders.values())


def read_rate(datamodule, epochs: int) -> float:  # noqa: ANN001
    """Samples/s out of the training DataLoader over ``epochs`` epochs, from the first batch on."""
    loader = datamodule.train_dataloader()
    samples, t0 = 0, None
    for _ in range(epochs):
        for batch in loader:
            if t0 is None:
                t0 = time.perf_counter()  # worker start-up excluded
                continue
            samples += int(batch["labels"].shape[0])
    return samples / (time.perf_counter() - t0) if samples else float("nan")


def measure(size: str, encoders: list[str], dtype: str, k: int | None, args: argparse.Namespace, out: Path,
            ref_bytes: dict[str, int]) -> None:
    base = size == "base"
    overrides = ["cache.enabled=true", f"cache.dtype={dtype}", f"cache.tokens_per_encoder={k or 'null'}",
                 f"fusion.tokens_per_encoder={k or 'null'}", "data.num_workers=2", "cache.num_workers=2"]
    cfg = shapes_config(encoders, args, out, base, overrides)
    pl.seed_everything(cfg.seed, verbose=False)
    datamodule, model = build(cfg)
    if not fits(model, k):
        print(f"{size:<5} {storage_name(dtype, k):<16} skipped: K={k} exceeds an encoder's patch grid", flush=True)
        return
    datamodule.task.prepare_data()
    images = images_of(ex for split in datamodule.cached_splits() for ex in datamodule.task.examples(split))
    t0 = time.perf_counter()
    for encoder in model.encoders.values():
        build_cache(encoder, images, cfg.cache.dir, dtype=dtype, tokens_per_encoder=k, force=True,
                    batch_size=cfg.cache.batch_size, num_workers=2, progress=False)
    build_rate = len(images) / (time.perf_counter() - t0)
    datamodule.prepare_data()  # opens the caches just built
    nbytes = sum(c.bytes_per_image for c in datamodule.caches.values())
    ref_bytes.setdefault(size, nbytes)  # the first row is float16 full
    reads = read_rate(datamodule, args.read_epochs)
    steps = args.base_steps if base else args.steps
    warmup = args.warmup if args.warmup is not None else (1 if base else 5)
    step = fit(cfg, datamodule, model, copy.deepcopy(model.state_dict()), steps, warmup)
    tokens = "+".join(str(c.shape[1]) for c in datamodule.caches.values())
    print(f"{size:<5} {storage_name(dtype, k):<16} {tokens:>12} {nbytes:>10} {nbytes / ref_bytes[size]:>6.3f} "
          f"{build_rate:>11.1f} {reads:>10.0f} {step:>10.1f}", flush=True)


def zoo_weights(args: argparse.Namespace) -> list[str]:
    """``encoder.<n>.weights=<zoo>/<n>.safetensors`` for the tiny towers, pretraining them first if missing."""
    files = {n: args.zoo_dir / f"{n}.safetensors" for n in TINY}
    if not all(f.is_file() for f in files.values()):
        steps = [] if args.pretrain_steps is None else [
            f"zoo.recipe.{n}.trainer.max_steps={args.pretrain_steps}" for n in TINY
        ]
        print(f"pretraining the zoo towers into {args.zoo_dir} (train.py +experiment=zoo/all"
              f"{f', {args.pretrain_steps} steps each' if args.pretrain_steps else ''})", flush=True)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "+experiment=zoo/all", f"zoo.out_dir={args.zoo_dir}",
             "zoo.report=false", "logger=csv", f"hydra.run.dir={args.zoo_dir / 'run'}", *steps],
            cwd=ROOT, capture_output=True, text=True, env=child_env(args),
        )
        if proc.returncode != 0:
            raise SystemExit(f"zoo pretraining failed:\n{proc.stderr[-3000:]}")
    return [f"encoder.{n}.weights={f}" for n, f in files.items()]


def accuracy(storage: str, seed: int, weights: list[str], args: argparse.Namespace, out: Path) -> float:
    """Test accuracy of one ``train.py +experiment=shapes`` run through the cache with ``storage``."""
    dtype, _, k = storage.partition("/")
    run_dir = out / f"acc-{storage.replace('/', '_')}-{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "+experiment=shapes", f"seed={seed}", "logger=csv",
           "cache.enabled=true", f"cache.dir={args.cache_dir}", f"cache.dtype={dtype}",
           f"cache.tokens_per_encoder={k or 'null'}", f"fusion.tokens_per_encoder={k or 'null'}",
           f"hydra.run.dir={run_dir}", *weights, *args.overrides]
    if args.acc_epochs is not None:
        cmd.append(f"trainer.max_epochs={args.acc_epochs}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=child_env(args))
    if proc.returncode != 0:
        raise SystemExit(f"training with {storage} (seed {seed}) failed:\n{proc.stderr[-3000:]}")
    return float(json.loads((run_dir / "metrics.json").read_text())["test/acc"])


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of a ``train.py`` child: ``--threads`` torch threads if given (torch reads OMP_NUM_THREADS)."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def storage_accuracies(storage: str, weights: list[str], args: argparse.Namespace, out: Path) -> list[float]:
    """Test accuracy of each seed with ``storage``, one after the other (they share the storage's cache)."""
    accs = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        accs.append(accuracy(storage, seed, weights, args, out))
        # progress for a batch log: the table's row comes when every seed of the storage is done
        print(f"  ({storage} seed {seed}: {accs[-1]:.4f} in {(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "int8"])
    parser.add_argument("--pool", nargs="+", type=int, default=[16, 49], help="K of pooled caches, base size")
    parser.add_argument("--tiny-pool", nargs="+", type=int, default=[4, 16], help="K of pooled caches, tiny")
    parser.add_argument("--read-epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps, tiny encoders")
    parser.add_argument("--base-steps", type=int, default=3, help="timed training steps, base-size encoders")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5 tiny, 1 base)")
    parser.add_argument("--seeds", type=int, default=3, help="accuracy runs per storage (0: no accuracy)")
    parser.add_argument("--acc-epochs", type=int, default=None, help="epochs of each accuracy run (default 8)")
    parser.add_argument("--acc-storages", nargs="+", default=None,
                        help="storages trained for accuracy, e.g. float16 int8/16 (default: every tiny row)")
    parser.add_argument("--accuracy-only", action="store_true",
                        help="only the accuracy part (storages from --acc-storages, or every tiny storage)")
    parser.add_argument("--acc-jobs", type=int, default=1,
                        help="accuracy runs side by side (e.g. 2 with --threads 1 on 2 cores)")
    parser.add_argument("--zoo-dir", type=Path, default=ROOT / "zoo")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="steps per zoo tower if the towers must be pretrained (default: the recipes')")
    add_size_arguments(parser)
    args = parser.parse_args()
    start(args)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    if not args.accuracy_only:
        print(f"{'size':<5} {'storage':<16} {'tokens/img':>12} {'B/img':>10} {'x f16':>6} {'build img/s':>11} "
              f"{'read smp/s':>10} {'step smp/s':>10}")
    ref_bytes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sizes = ([] if args.only_base else [("tiny", TINY, args.tiny_pool)])
        sizes += [("base", BASE, args.pool)] if args.base or args.only_base else []
        tiny_storages = []
        for size, encoders, pools in sizes:
            for dtype in args.dtypes:
                for k in [None, *pools]:
                    if not args.accuracy_only:
                        measure(size, encoders, dtype, k, args, out, ref_bytes)
                    if size == "tiny":
                        tiny_storages.append(storage_name(dtype, k))
        if args.seeds and not args.only_base:
            chosen = args.acc_storages or tiny_storages
            epochs = args.acc_epochs if args.acc_epochs is not None else "8 (the experiment's)"
            print(f"\naccuracy: shapes test/acc, zoo towers, {args.seeds} seed(s), {epochs} epochs each"
                  + (" (REDUCED: fewer than the experiment's 8 epochs)" if args.acc_epochs is not None else "")
                  + (" (REDUCED: fewer than 3 seeds)" if args.seeds < 3 else ""), flush=True)
            weights = zoo_weights(args)
            print(f"{'storage':<16} {'test acc mean':>13} {'std':>7}   per seed", flush=True)
            # Storages run side by side in --acc-jobs processes (each storage's seeds in turn, so one process
            # builds each cache); the rows print in order. Accuracy is not a rate, so sharing cores is fair.
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.acc_jobs) as pool:
                runs = [pool.submit(storage_accuracies, s, weights, args, out) for s in chosen]
                for storage, run in zip(chosen, runs, strict=True):
                    accs = run.result()
                    std = statistics.stdev(accs) if len(accs) > 1 else float("nan")
                    print(f"{storage:<16} {statistics.mean(accs):>13.4f} {std:>7.4f}   "
                          f"{' '.join(f'{a:.4f}' for a in accs)}", flush=True)
            print(f"accuracy part: {(time.perf_counter() - t0) / 60:.1f} min, {args.acc_jobs} run(s) at a time",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
