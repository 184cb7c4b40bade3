"""Memory and lookup time of a cache's key -> row index: the ``index.json`` dict vs the compact sorted keys.

For each key pattern a cache of ``--images`` rows is written by the package's own writer
(:class:`fusion.data.cache.writer.PartialCache`) with ``(N, 1, 1)`` features, so that only the index weighs
anything. Then, in a fresh process per (pattern, representation), ``RssAnon`` (``/proc/self/status``) is
read before and after the index is loaded and kept:

- ``dict``: ``json.loads`` of ``index.json``, what :class:`~fusion.data.cache.store.FeatureCache` held before
  (one ``str`` and one ``int`` object per image, plus the hash table);
- ``compact``: :class:`~fusion.data.cache.store.FeatureCache` as it is now (keys sorted as fixed-width UTF-8
  bytes + an int64 row per key, looked up with ``np.searchsorted``).

``VmHWM`` growth is the peak while loading (opening still parses ``index.json`` into a dict once, to
check it, then drops it). ``trimmed`` is the ``RssAnon`` growth after glibc's ``malloc_trim(0)`` hands
the allocator's free pages back to the system (what the kept index really needs; the package never
calls it). ``lookup us`` is the median time to find the rows of one batch of
``--batch`` random keys (``dict``: the previous ``np.fromiter`` over dict lookups). Every DataLoader
worker holds what the main process holds, for every encoder.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATTERNS = {  # like the tasks' keys: bench/memory.py's, VQA's (COCO ids), NLVR2's
    "mem/{i:06d}": "memory.py",
    "coco/train2014/{i:012d}": "vqa",
    "nlvr2/train/train-{i:08d}-0-img0": "nlvr2",
}


def status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def synthesize(folder: Path, pattern: str, n: int) -> Path:
    from fusion.data.cache.files import keys_digest
    from fusion.data.cache.writer import PartialCache

    folder.mkdir(parents=True, exist_ok=True)
    keys = [pattern.format(i=i) for i in range(n)]
    fp = {"name": "index_bench", "dtype": "float16"}
    meta = {"fingerprint": fp, "shape": [n, 1, 1], "dtype": "float16", "keys_digest": keys_digest(keys), "shard": None}
    partial = PartialCache(folder / "index_bench", meta, keys)
    partial.open(resume=False)
    partial.write(0, np.zeros((n, 1, 1), np.float16))
    partial.finish()
    partial.publish()
    return partial.final


def child(path: Path, how: str, pattern: str, n: int, batch: int, repeats: int) -> dict[str, float]:
    from fusion.data.cache.files import INDEX
    from fusion.data.cache.store import FeatureCache

    rng = np.random.default_rng(0)
    queries = [[pattern.format(i=int(i)) for i in rng.integers(0, n, batch)] for _ in range(repeats)]
    before = status()
    if how == "dict":
        index = json.loads((path / INDEX).read_text())

        def lookup(keys: list[str]) -> np.ndarray:
            return np.fromiter((index[k] for k in keys), dtype=np.int64, count=len(keys))
    else:
        cache = FeatureCache(path)
        lookup = cache.rows
    gc.collect()
    after = status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = status()
    times = []
    for keys in queries:
        t0 = time.perf_counter()
        lookup(keys)
        times.append(time.perf_counter() - t0)
    return {
        "anon_kib": after["RssAnon"] - before["RssAnon"],
        "hwm_kib": after["VmHWM"] - before["VmHWM"],
        "trimmed_kib": trimmed["RssAnon"] - before["RssAnon"],
        "lookup_us": float(np.median(times)) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--child", nargs=3, metavar=("PATH", "HOW", "PATTERN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, how, pattern = args.child
        print("RESULT " + json.dumps(child(Path(path), how, pattern, args.images, args.batch, args.repeats)))
        return

    print(f"{args.images} images, batch {args.batch}, median of {args.repeats} lookups, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start; one fresh process per row")
    print(f"{'keys':<34} {'like':<9} {'index':<8} {'RssAnon MiB':>11} {'B/image':>8} {'trimmed MiB':>11} "
          f"{'peak MiB':>9} {'lookup us':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for pattern, like in PATTERNS.items():
            path = synthesize(Path(tmp) / like, pattern, args.images)
            for how in ("dict", "compact"):
                cmd = [sys.executable, __file__, f"--images={args.images}", f"--batch={args.batch}",
                       f"--repeats={args.repeats}", "--child", str(path), how, pattern]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    sys.exit(f"measurement failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                r = json.loads(line[len("RESULT "):])
                print(f"{pattern:<34} {like:<9} {how:<8} {r['anon_kib'] / 1024:>11.1f} "
                      f"{r['anon_kib'] * 1024 / args.images:>8.0f} {r['trimmed_kib'] / 1024:>11.1f} "
                      f"{r['hwm_kib'] / 1024:>9.1f} {r['lookup_us']:>10.1f}", flush=True)


if __name__ == "__main__":
    main()
