"""Command line for the feature cache: build (a shard of) a cache, merge shards, describe or verify a cache.

    python -m fusion.data.cache build --encoder clip_tiny --image-dir data/imgs --key-prefix coco/ --root cache
    python -m fusion.data.cache build --encoder clip --set weights=/models/clip.safetensors \\
        --images images.json --root cache --shard $SLURM_ARRAY_TASK_ID --num-shards 8
    python -m fusion.data.cache merge --encoder clip --set weights=/models/clip.safetensors --root cache --num-shards 8
    python -m fusion.data.cache build --encoder siglip --image-dir data/imgs --root cache --dtype int8 \
        --tokens-per-encoder 16
    python -m fusion.data.cache info cache/clip-0123456789ab
    python -m fusion.data.cache verify cache/clip-0123456789ab

``--encoder`` is a name under ``conf/encoder/`` or a YAML file in that format; ``--set key=value``
overrides its fields. ``--images`` is a JSON object ``{image_key: path}`` or lines ``key<TAB>path``;
``--image-dir`` takes every file below it whose name ends in one of ``IMAGE_SUFFIXES``; an image list or
folder without images stops the build (exit status 1) naming it. ``verify`` checks every row against the
checksums written at build time and exits 1 naming the file and the first bad rows (or saying the cache
has no checksums); a damaged cache is rebuilt with ``build ... --force`` or by deleting its folder.
``--dtype`` (float16, float32, int8, float8_e4m3fn) and ``--tokens-per-encoder K`` (store the patch grid
pooled to K tokens) choose the storage, as ``cache.dtype`` / ``cache.tokens_per_encoder`` do for runs;
``info`` prints the metadata as JSON, with a ``storage`` entry: dtype, pooling, bytes per image, total size.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fusion.data.cache.build import build_cache
from fusion.data.cache.errors import CacheError
from fusion.data.cache.files import CHECKSUMS, INDEX
from fusion.data.cache.fingerprint import cache_fingerprint
from fusion.data.cache.merge import merge_shards
from fusion.data.cache.storage import STORAGES
from fusion.data.cache.store import FeatureCache

CONF_ENCODER = Path(__file__).resolve().parents[3] / "conf" / "encoder"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def load_encoder(spec: str, overrides: list[str]) -> Any:
    """An encoder from ``conf/encoder/<spec>.yaml`` (or the YAML file ``spec``) with dotlist overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = Path(spec) if spec.endswith((".yaml", ".yml")) else CONF_ENCODER / f"{spec}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_ENCODER.glob("*.yaml"))
        raise SystemExit(f"error: no encoder config {path}; known encoders: {', '.join(known)}")
    cfg = OmegaConf.load(path)
    if "_target_" not in cfg and len(cfg) == 1:  # conf/encoder files nest the config under its name
        cfg = next(iter(cfg.values()))
    return instantiate(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)))


def load_images(images: str | None, image_dir: str | None, key_prefix: str) -> dict[str, str]:
    """``{image_key: path}`` from ``--images`` or ``--image-dir`` (key = prefix + relative path sans suffix).

    A missing list or folder, or one without images, exits naming it: an empty build would publish an
    empty cache that every later run takes for a complete one.
    """
    if images:
        try:
            text = Path(images).read_text()
        except OSError as e:
            raise SystemExit(f"error: cannot read the image list --images {images} ({e.strerror or e})") from e
        if text.lstrip().startswith("{"):
            listed = {str(k): str(v) for k, v in json.loads(text).items()}
        else:
            listed = dict(line.split("\t", 1) for line in text.splitlines() if line.strip())
        if not listed:
            raise SystemExit(f"error: the image list --images {images} lists no images; nothing to build")
        return listed
    folder = Path(image_dir)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise SystemExit(f"error: image folder --image-dir {folder} {what}; nothing to build")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SystemExit(
            f"error: no images under --image-dir {folder} (images are files ending in "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}, any case); nothing to build"
        )
    return {key_prefix + p.relative_to(folder).with_suffix("").as_posix(): str(p) for p in files}


def verify(path: str) -> str:
    """Check every row of the cache at ``path`` against its checksums; a one-line report (raises on failure)."""
    cache = FeatureCache(path, check_rows=0)  # every row is checked below, the sample would only repeat it
    rows = cache.verify(progress=True)
    return f"ok: feature cache {cache.path}: all {rows} rows match their checksums ({CHECKSUMS}, {INDEX})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusion.data.cache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "merge"):
        p = sub.add_parser(name)
        p.add_argument("--encoder", required=True, help="conf/encoder name or YAML file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="encoder config override")
        p.add_argument("--root", required=True, help="cache root folder (paths.cache_dir)")
        p.add_argument("--dtype", default="float16", choices=list(STORAGES),
                       help="storage: float16 (default), float32, int8 or float8_e4m3fn (quantised, per-row scales)")
        p.add_argument("--tokens-per-encoder", type=int, default=None, metavar="K",
                       help="store each image's patch grid pooled to K tokens (a perfect square; [CLS] kept)")
    build, merge = sub.choices["build"], sub.choices["merge"]
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="JSON {key: path} or key<TAB>path lines")
    source.add_argument("--image-dir", help="every image below this folder")
    build.add_argument("--key-prefix", default="", help="prepended to keys from --image-dir")
    build.add_argument("--shard", type=int, default=None)
    build.add_argument("--num-shards", type=int, default=None)
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--workers", type=int, default=2)
    build.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    merge.add_argument("--num-shards", type=int, required=True)
    merge.add_argument("--keep-shards", action="store_true")
    info = sub.add_parser("info")
    info.add_argument("path")
    check = sub.add_parser("verify", help="check every row of a cache against its build-time checksums")
    check.add_argument("path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        if args.command == "info":
            cache = FeatureCache(args.path)
            print(json.dumps({"path": str(cache.path), "storage": cache.describe(), **cache.meta}, indent=1))
            return
        if args.command == "verify":
            print(verify(args.path))
            return
        if args.command == "build":
            if (args.shard is None) != (args.num_shards is None):
                parser.error("--shard and --num-shards go together")
            images = load_images(args.images, args.image_dir, args.key_prefix)  # before the (slow) encoder
        encoder = load_encoder(args.encoder, args.set)
        if args.command == "build":
            cache = build_cache(
                encoder, images, args.root,
                dtype=args.dtype, tokens_per_encoder=args.tokens_per_encoder, shard=args.shard,
                num_shards=args.num_shards,
                batch_size=args.batch_size, num_workers=args.workers, force=args.force,
            )
        else:
            fp = cache_fingerprint(encoder, args.dtype, args.tokens_per_encoder)
            cache = merge_shards(args.root, fp, args.num_shards, keep_shards=args.keep_shards)
    except (CacheError, ValueError) as e:
        sys.exit(f"error: {e}")
    pooled = f" tokens_per_encoder={cache.tokens_per_encoder}" if cache.tokens_per_encoder is not None else ""
    print(f"{cache.path} {tuple(cache.shape)} {cache.storage.name}{pooled} {cache.bytes_per_image} B/image")


if __name__ == "__main__":
    main()
