"""Feature-cache build speed against a bare ``forward_features`` loop over the same images.

    python bench/extract.py                       # the tiny encoders, 256 images
    python bench/extract.py --base --images 64    # + base-size CLIP / DINO / ViT towers (random init)

For each encoder, in one process: (a) a bare loop of ``model.forward_features`` over pixel batches that
were decoded and preprocessed beforehand (the encoder's own cost and nothing else), (b) the same bare loop
fed by the same DataLoader the build uses (decode + preprocess in ``--workers`` workers: everything a
build must do except storing), (c) a full :func:`fusion.data.cache.build_cache` over the same image files and
batch size (that loader, encoder, fp16 conversion, writes, publish). Each is run ``--repeats`` times and
the best is kept. Printed: images/s of the three, ``build/bare`` (1.0 = the cache costs nothing on top of
the encoder; decoding dominates for tiny encoders) and ``build/loop`` (what storing costs on top of
reading and encoding: the cache's own overhead). Images are random JPEGs of ``--image-size`` px, like COCO
photos in cost to decode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torch.utils.data import DataLoader  # noqa: E402

from fusion.data.cache import build_cache  # noqa: E402
from fusion.data.cache.build import ImageFiles  # noqa: E402
from fusion.data.images import load_image  # noqa: E402
from fusion.encoders.vision import TimmEncoder  # noqa: E402


def encoder(name: str) -> TimmEncoder:
    """``conf/encoder/<name>.yaml`` as training builds it, but random init (no download, no weights file)."""
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "encoder" / f"{name}.yaml")[name])
    cfg.pop("_target_")
    return TimmEncoder(**{**cfg, "pretrained": False, "weights": None})


def make_images(folder: Path, n: int, size: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    # Smooth random images: JPEG decodes them at a realistic cost (pure noise would be atypically slow).
    base = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    out = {}
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(base[i]).resize((size, size), Image.BILINEAR).save(path, quality=90)
        out[f"bench/{i:05d}"] = path
    return out


def bare_loop(enc: TimmEncoder, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds for ``model.forward_features`` over ``pixels`` (N, 3, H, W) in batches."""
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(0, len(pixels), batch_size):
            enc.model.forward_features(pixels[i : i + batch_size])
        return time.perf_counter() - start


def loader_loop(enc: TimmEncoder, images: dict[str, Path], batch_size: int, workers: int) -> float:
    """Seconds for ``model.forward_features`` fed by the build's own DataLoader (decode + preprocess)."""
    loader = DataLoader(ImageFiles(list(images.items()), enc.preprocess.transform()), batch_size=batch_size,
                        num_workers=workers)
    with torch.inference_mode():
        start = time.perf_counter()
        for pixels in loader:
            enc.model.forward_features(pixels)
        return time.perf_counter() - start


def cache_build(enc: TimmEncoder, images: dict[str, Path], root: Path, batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    build_cache(enc, images, root, batch_size=batch_size, num_workers=workers, force=True, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the cache build")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--base", action="store_true", help="also the base-size clip, dino, vit (random init)")
    parser.add_argument("--only-base", action="store_true", help="only the base-size encoders")
    args = parser.parse_args()
    names = [] if args.only_base else ["clip_tiny", "dino_tiny", "vit_tiny"]
    names += ["clip", "dino", "vit"] if args.base or args.only_base else []

    print(f"{args.images} images {args.image_size}px JPEG, batch {args.batch_size}, build workers {args.workers}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, best of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'encoder':<10} {'tokens x dim':>13} {'bare img/s':>11} {'loop img/s':>11} {'build img/s':>12} "
          f"{'build/bare':>11} {'build/loop':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "img"
        folder.mkdir()
        images = make_images(folder, args.images, args.image_size)
        for name in names:
            enc = encoder(name)
            tf = enc.preprocess.transform()
            pixels = torch.stack([tf(load_image(p)) for p in images.values()])  # outside the bare timing
            bare_loop(enc, pixels, args.batch_size)  # warm-up: the first passes of a fresh model are slow
            bare, loop, build = float("inf"), float("inf"), float("inf")
            for _ in range(args.repeats):  # interleaved, so a burst of load elsewhere hits all alike
                bare = min(bare, bare_loop(enc, pixels, args.batch_size))
                loop = min(loop, loader_loop(enc, images, args.batch_size, args.workers))
                build = min(build, cache_build(enc, images, Path(tmp) / "cache", args.batch_size, args.workers))
            n = len(images)
            print(f"{name:<10} {f'{enc.num_tokens} x {enc.embed_dim}':>13} {n / bare:>11.1f} {n / loop:>11.1f} "
                  f"{n / build:>12.1f} {bare / build:>11.2f} {loop / build:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
