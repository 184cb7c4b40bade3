"""Where caches live under a cache root: folder names for caches, shards and locks; finding neighbours.

``<root>/<name>-<hash>/`` is a cache, ``<root>/<name>-<hash>.shard-003-of-008/`` one shard of it,
``<root>/.<folder>.lock`` the lock its builders take and ``<root>/.<folder>.partial/`` a build in progress
(see :mod:`fusion.data.cache.writer`). Hidden names never match a cache name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fusion.data.cache.errors import FingerprintMismatchError
from fusion.data.cache.files import META
from fusion.data.cache.fingerprint import diff, folder_name

_SHARD = re.compile(r"\.shard-(\d+)-of-(\d+)$")


def cache_path(
    root: Path, fingerprint: dict[str, Any], shard: int | None = None, num_shards: int | None = None
) -> Path:
    """Folder of the cache of ``fingerprint`` under ``root``, or of one of its shards."""
    name = folder_name(fingerprint)
    if num_shards is not None:
        name = f"{name}.shard-{shard or 0:03d}-of-{num_shards:03d}"
    return Path(root) / name


def lock_path(path: Path) -> Path:
    """The lock file builders of ``path`` take (beside it: the folder itself is replaced by a rename)."""
    return path.parent / f".{path.name}.lock"


def find_shards(path: Path) -> dict[int, list[int]]:
    """``{num_shards: [shard indices present]}`` among the shard folders of the cache ``path``."""
    found: dict[int, list[int]] = {}
    for p in path.parent.glob(f"{path.name}.shard-*-of-*"):
        m = _SHARD.search(p.name)
        if m and p.is_dir():
            found.setdefault(int(m.group(2)), []).append(int(m.group(1)))
    return {n: sorted(v) for n, v in found.items()}


def nearest_mismatch(root: Path, fingerprint: dict[str, Any]) -> FingerprintMismatchError | None:
    """An error describing the cache of the same encoder name closest to ``fingerprint``, if any.

    Caches of other configurations sit in other folders (the hash differs), so a changed weight file,
    layer or preprocessing finds no cache; this names which fields changed relative to the old one.
    """
    prefix = folder_name(fingerprint).rsplit("-", 1)[0]
    best: tuple[int, Path, list[tuple[str, Any, Any]]] | None = None
    for meta_file in Path(root).glob(f"{prefix}-*/{META}"):
        if _SHARD.search(meta_file.parent.name):
            continue
        try:
            cached = json.loads(meta_file.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            continue
        if cached.get("name") != fingerprint.get("name"):
            continue
        fields = diff(cached, fingerprint)
        if fields and (best is None or len(fields) < best[0]):
            best = (len(fields), meta_file.parent, fields)
    if best is None:
        return None
    _, folder, fields = best
    what = "; ".join(f"{k}: cached {a!r}, configured {b!r}" for k, a, b in fields)
    return FingerprintMismatchError(
        f"no feature cache for the configured encoder {fingerprint.get('name')!r} under {root}; "
        f"the cache {folder} was built for a different configuration: {what}"
    )
