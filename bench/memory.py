"""Peak RSS of a training epoch that reads every row of the feature caches: 1k vs 100k images.

    python bench/memory.py                           # 1k and 100k images, both readers, one epoch each
    python bench/memory.py --mode train --steps 30   # a Lightning training run (30 steps) instead
    python bench/memory.py --sizes 1000 100000 --readers pread

For each cache size the caches of the encoders (default: the shapes experiment's three tiny towers,
17/37/17 tokens x 64, float16) are synthesized directly in the on-disk format: random rows written by
the package's own writer (:class:`fusion.data.cache.writer.PartialCache`: temporary folder, ``COMPLETE``
marker, atomic publish) under the encoder's real fingerprint, so the data module's ``prepare_data``
finds and opens them as built caches (nothing is encoded). Then, in a fresh subprocess per (size,
reader), the real :class:`fusion.data.module.FusionDataModule` (``cache.enabled``, 2 DataLoader workers, the
collator's per-batch gather) feeds either a bare pass over the training loader (``--mode read``, the
default) or a Lightning training run of :class:`fusion.training.module.FusionLitModule` (``--mode train``). Every
example has its own image, so one epoch reads every row of every cache once, in shuffled order. (A
training epoch over 100k images is 1563 steps: too long on a shared 2-core CPU, hence ``--steps``.)

A sampler thread in that subprocess reads ``/proc/<pid>/status`` of itself and of its DataLoader
workers every 20 ms: peak ``VmRSS`` (``VmHWM``) of the main process and of the largest worker, split
into ``RssAnon`` (heap: tensors, index, examples) and ``RssFile`` (file pages mapped into the process,
e.g. a memory-mapped cache; reclaimable page cache, but counted in RSS), and the peak of their sum.

Readers: ``pread`` is the package's :meth:`FeatureCache.get` (rows read with ``os.preadv`` straight
into the batch's array, no mapping); ``memmap`` is the previous reader, ``np.take`` from a read-only
``np.memmap`` of the whole file, patched in for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion.tasks.base import Example, VLTask  # noqa: E402

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


# ---- the synthetic task and caches -------------------------------------------------------------
class CachedOnlyTask(VLTask):
    """``n`` training examples, one image each (key ``mem/<i>``): every encoder is cached, none decoded."""

    name = "memory_bench"

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def answers(self) -> list[str]:
        return [f"a{i}" for i in range(16)]

    @property
    def answer_types(self) -> list[str]:
        return []

    def prepare_data(self) -> None:
        pass

    def examples(self, split: str) -> list[Example]:
        # val/test reuse the first training images: the caches hold exactly n images.
        count = self.n if split == "train" else min(self.n, 256)
        return [
            Example(question_id=f"{split}/{i}", image_key=f"mem/{i:06d}", image_path=Path(f"/nonexistent/{i}.jpg"),
                    question=f"what color is shape {i % 97}?", label=i % 16)
            for i in range(count)
        ]


def compose_cfg(args: argparse.Namespace, cache_dir: Path):
    from hydra import compose, initialize_config_dir

    overrides = [
        "+experiment=shapes",
        f"encoder=[{','.join(args.encoders)}]",
        f"paths.root_dir={ROOT}",
        f"paths.output_dir={cache_dir.parent / 'run'}",
        "cache.enabled=true",
        "cache.rebuild=false",  # a synthesized cache that did not match would stop the run, not be rebuilt
        f"cache.dir={cache_dir}",
        f"data.num_workers={args.workers}",
        f"data.batch_size={args.batch_size}",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def synthesize(args: argparse.Namespace, n: int, cache_dir: Path) -> float:
    """Write a complete cache of ``n`` random rows per encoder, as the builder would publish it; MiB on disk."""
    from fusion.data.cache import cache_fingerprint, cache_path, images_of
    from fusion.data.cache.files import keys_digest
    from fusion.data.cache.writer import PartialCache
    from fusion.run.commands import build_encoders

    cfg = compose_cfg(args, cache_dir)
    keys = sorted(images_of(CachedOnlyTask(n).examples("train")))
    rng = np.random.default_rng(0)
    cache_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for enc in build_encoders(cfg).values():
        fp = cache_fingerprint(enc, cfg.cache.dtype)
        meta = {"fingerprint": fp, "shape": [n, enc.num_tokens, enc.embed_dim], "dtype": fp["dtype"],
                "keys_digest": keys_digest(keys), "shard": None}
        partial = PartialCache(cache_path(cache_dir, fp), meta, keys)
        partial.open(resume=False)
        block = rng.standard_normal((4096, enc.num_tokens, enc.embed_dim), dtype=np.float32).astype(fp["dtype"])
        for lo in range(0, n, len(block)):
            rows = min(len(block), n - lo)
            partial.write(lo, np.roll(block, lo, axis=0)[:rows])  # rows differ from block to block
        partial.finish()
        partial.publish()
        total += partial.nbytes
    return total / 2**20


# ---- measuring, in the subprocess ----------------------------------------------------------------
def status(pid: int | str) -> dict[str, int] | None:
    """The memory fields of ``/proc/<pid>/status``, in KiB (None once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


class Sampler(threading.Thread):
    """Polls the memory of this process and its children (DataLoader workers) until stopped."""

    def __init__(self, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.main: dict[str, int] = {}
        self.workers: dict[int, dict[str, int]] = {}  # per pid: the sample at its largest VmRSS, + VmHWM
        self.total = {"VmRSS": 0}
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self._stop_event.is_set():
            self.sample(me)
            self._stop_event.wait(self.period)
        self.sample(me)

    def sample(self, me: int) -> None:
        total = {k: 0 for k in FIELDS}
        for pid in [me, *children(me)]:
            s = status(pid)
            if not s:
                continue
            for k in FIELDS:
                total[k] += s.get(k, 0)
            if pid == me:
                if s["VmRSS"] >= self.main.get("VmRSS", 0):
                    self.main = {**s}
                self.main["VmHWM"] = s["VmHWM"]
            else:
                best = self.workers.get(pid, {})
                if s["VmRSS"] >= best.get("VmRSS", 0):
                    best = {**s}
                best["VmHWM"] = s["VmHWM"]
                self.workers[pid] = best
        if total["VmRSS"] > self.total["VmRSS"]:
            self.total = total

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def patch_memmap_reader() -> None:
    """The previous FeatureCache.get: one ``np.take`` from a memory map of the whole file."""
    import torch

    from fusion.data.cache.store import FeatureCache

    def get(self: FeatureCache, keys, dtype=None):
        out = torch.from_numpy(np.take(self.array(), self.rows(keys), axis=0))
        return out if dtype is None else out.to(dtype)

    FeatureCache.get = get


def child(args: argparse.Namespace) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch
    from hydra.utils import instantiate

    from fusion.run.commands import build_encoders, cache_settings

    torch.set_num_threads(args.threads)
    if args.reader == "memmap":
        patch_memmap_reader()
    pl.seed_everything(0, workers=True, verbose=False)
    cfg = compose_cfg(args, Path(args.cache_dir))
    encoders = build_encoders(cfg)
    text = instantiate(cfg.text)
    task = CachedOnlyTask(args.size)
    transforms = {name: enc.preprocess.transform() for name, enc in encoders.items()}
    datamodule = instantiate(cfg.data, _partial_=True)(
        task=task, transforms=transforms, tokenizer=text.tokenizer, encoders=encoders, cache=cache_settings(cfg)
    )
    sampler = Sampler()
    sampler.start()
    start_rss = status("self")
    start = time.perf_counter()
    batches = 0
    if args.mode == "train":
        model = instantiate(cfg.training, encoders=encoders, text=text, task=task, fusion=instantiate(cfg.fusion))
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, max_steps=args.steps or -1, limit_val_batches=0,
            num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=datamodule)
        batches = trainer.global_step
    else:
        datamodule.prepare_data()
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        for i, _ in enumerate(loader):
            batches = i + 1
            if args.steps and batches >= args.steps:
                break
        del loader
    seconds = time.perf_counter() - start
    sampler.stop()
    caches = datamodule.caches or {}
    worker = max(sampler.workers.values(), key=lambda s: s["VmHWM"], default={})
    return {
        "size": args.size,
        "reader": args.reader,
        "batches": batches,
        "seconds": seconds,
        "cache_mib": sum(c.shape[0] * c.shape[1] * c.shape[2] * c.dtype.itemsize for c in caches.values()) / 2**20,
        "start": start_rss,
        "main": sampler.main,
        "worker": worker,
        "num_workers_seen": len(sampler.workers),
        "total": sampler.total,
    }


# ---- the driver ----------------------------------------------------------------------------------
def mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--readers", nargs="+", default=["memmap", "pread"], choices=["memmap", "pread"])
    parser.add_argument("--mode", choices=["train", "read"], default="read",
                        help="train: Lightning fit over one epoch; read: iterate the training loader only")
    parser.add_argument("--steps", type=int, default=0, help="stop after this many batches (0: one full epoch)")
    parser.add_argument("--encoders", nargs="+", default=["clip_tiny", "dino_tiny", "vit_tiny"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the measured process")
    parser.add_argument("--root", type=Path, default=None, help="where to write the caches (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the run (e.g. fusion.width=256)")
    # internal: one measurement in this (fresh) process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--reader", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    print(f"mode {args.mode} ({'one epoch' if not args.steps else f'{args.steps} batches'}), encoders "
          f"{','.join(args.encoders)}, batch {args.batch_size}, {args.workers} workers, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; MiB; one fresh process per row")
    head = (f"{'images':>7} {'cache MiB':>9} {'reader':>7} {'batches':>7} {'s':>6} | {'main HWM':>8} {'anon':>6} "
            f"{'file':>6} | {'worker HWM':>10} {'anon':>6} {'file':>6} | {'sum peak':>8} {'anon':>6} {'file':>6}")
    print(head, flush=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        for size in args.sizes:
            cache_dir = Path(tmp) / f"features-{size}"
            synthesize(args, size, cache_dir)
            for reader in args.readers:
                cmd = [sys.executable, __file__, "--child", f"--size={size}", f"--reader={reader}",
                       f"--cache-dir={cache_dir}", f"--mode={args.mode}", f"--steps={args.steps}",
                       f"--batch-size={args.batch_size}", f"--workers={args.workers}", f"--threads={args.threads}",
                       "--encoders", *args.encoders, "--", *args.overrides]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"measurement failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                r = json.loads(line[len("RESULT "):])
                results.append(r)
                m, w, t = r["main"], r["worker"], r["total"]
                print(f"{size:>7} {r['cache_mib']:>9.0f} {reader:>7} {r['batches']:>7} {r['seconds']:>6.1f} | "
                      f"{mib(m.get('VmHWM')):>8} {mib(m.get('RssAnon')):>6} {mib(m.get('RssFile')):>6} | "
                      f"{mib(w.get('VmHWM')):>10} {mib(w.get('RssAnon')):>6} {mib(w.get('RssFile')):>6} | "
                      f"{mib(t.get('VmRSS')):>8} {mib(t.get('RssAnon')):>6} {mib(t.get('RssFile')):>6}", flush=True)
    if len(args.sizes) >= 2:
        small, large = min(args.sizes), max(args.sizes)
        print(f"growth from {small} to {large} images (peak of the sum of all processes; main / largest worker HWM):")
        for reader in args.readers:
            a = next(r for r in results if r["size"] == small and r["reader"] == reader)
            b = next(r for r in results if r["size"] == large and r["reader"] == reader)
            dt = (b["total"]["VmRSS"] - a["total"]["VmRSS"]) / 1024
            dm = (b["main"]["VmHWM"] - a["main"]["VmHWM"]) / 1024
            dw = (b["worker"].get("VmHWM", 0) - a["worker"].get("VmHWM", 0)) / 1024
            print(f"  {reader:>7}: sum {dt:+.0f} MiB ({b['total']['VmRSS'] / a['total']['VmRSS']:.2f}x), "
                  f"main {dm:+.0f} MiB, worker {dw:+.0f} MiB; cache grew by {b['cache_mib'] - a['cache_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
