"""What identifies a cache's features: the encoder's fingerprint plus the feature shape and the storage.

The folder of a cache is named from the encoder name and a short hash of this fingerprint, so caches of
different weights, layers, preprocessing, dtypes (float16, float32, int8, float8_e4m3fn) or poolings
live side by side; the full fingerprint is also stored in the cache's metadata and compared field by
field when it is opened. A pooled cache adds a ``pooling`` entry; a full one has none, so caches built
before pooling existed keep their fingerprint and folder.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import numpy as np
import torch

# Bumped when the on-disk layout changes: old caches then no longer match and are rebuilt. Not bumped for
# checksums.npy: it only adds a file, so caches written before it keep their folder and still open (with a
# warning that they cannot be verified) instead of being orphaned and encoded again.
FORMAT_VERSION = 1

_DTYPES = {
    "float16": "float16", "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32",
    "int8": "int8", "float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn", "e4m3": "float8_e4m3fn",
}
# How a pooled cache pools (recorded in the fingerprint: another pooling would be another cache).
POOLING_METHOD = "prefix kept, patch grid adaptive_avg_pool2d in float32 (fusion.encoders.grid.pool_tokens)"


def normalize_dtype(dtype: str | np.dtype | torch.dtype) -> str:
    """``"fp16"``/``torch.float16``/``np.float16``... -> ``"float16"``; also float32, int8 and (where
    torch supports it) float8_e4m3fn."""
    from fusion.data.cache.storage import float8_supported

    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        try:
            name = np.dtype(dtype).name if not isinstance(dtype, torch.dtype) else name
        except TypeError:
            pass
    if name not in _DTYPES:
        raise ValueError(
            f"cache dtype (cache.dtype / --dtype) {dtype!r} is not supported; use float16 (default), float32, "
            "int8 or float8_e4m3fn"
        )
    if _DTYPES[name] == "float8_e4m3fn" and not float8_supported():
        raise ValueError(
            f"cache dtype {dtype!r}: this torch ({torch.__version__}) cannot cast to float8_e4m3fn on the CPU; "
            "use int8"
        )
    return _DTYPES[name]


def pooled_tokens(encoder: Any, tokens_per_encoder: int | None) -> int:
    """Tokens per image a cache of ``encoder`` pooled to ``tokens_per_encoder`` stores: prefix + K (or all).

    ValueError naming ``cache.tokens_per_encoder`` when K is not a perfect square or exceeds the grid.
    """
    from fusion.encoders.grid import patch_grid_side, pooled_grid_side

    if tokens_per_encoder is None:
        return int(encoder.num_tokens)
    k, prefix = tokens_per_encoder, int(getattr(encoder, "num_prefix_tokens", 1))
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"cache.tokens_per_encoder={k!r}: expected a perfect square integer (e.g. 16 or 49) or null")
    try:
        side = pooled_grid_side(k)
    except ValueError as e:
        raise ValueError(f"cache.{e}") from None
    grid = patch_grid_side(encoder.name, int(encoder.num_tokens), prefix)
    if side > grid:
        raise ValueError(
            f"cache.tokens_per_encoder={k} exceeds encoder {encoder.name!r}'s {grid} x {grid} patch grid "
            f"({grid * grid} patches); pooling only shrinks grids"
        )
    return prefix + k


def cache_fingerprint(
    encoder: Any, dtype: str | np.dtype | torch.dtype = "float16", tokens_per_encoder: int | None = None
) -> dict[str, Any]:
    """``encoder.fingerprint()`` (name, source, weights sha256, layer, preprocessing) + T, D, dtype, and
    for a pooled cache (``tokens_per_encoder`` K) the pooling (K, prefix tokens kept, method).

    ``num_tokens`` stays the encoder's own token count (the stored rows hold prefix + K of them).
    Round-tripped through JSON so it compares equal to the copy read back from ``meta.json``.
    """
    stored = pooled_tokens(encoder, tokens_per_encoder)
    fp = {
        **encoder.fingerprint(),
        "num_tokens": int(encoder.num_tokens),
        "embed_dim": int(encoder.embed_dim),
        "dtype": normalize_dtype(dtype),
        "format": FORMAT_VERSION,
    }
    if tokens_per_encoder is not None:
        fp["pooling"] = {
            "tokens_per_encoder": int(tokens_per_encoder),
            "prefix_tokens": stored - int(tokens_per_encoder),
            "method": POOLING_METHOD,
        }
    return json.loads(json.dumps(fp))


def stored_tokens(fingerprint: dict[str, Any]) -> int:
    """Tokens per image the cache of ``fingerprint`` stores (prefix + K when pooled)."""
    pooling = fingerprint.get("pooling")
    if pooling:
        return int(pooling["prefix_tokens"]) + int(pooling["tokens_per_encoder"])
    return int(fingerprint["num_tokens"])


def short_hash(fingerprint: dict[str, Any], length: int = 12) -> str:
    """Hex digest of the canonical JSON of ``fingerprint``."""
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def folder_name(fingerprint: dict[str, Any]) -> str:
    """``<encoder name>-<hash>``, the name made filesystem-safe (the hash keeps it unique)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(fingerprint.get("name", "encoder"))).strip("._") or "encoder"
    return f"{safe}-{short_hash(fingerprint)}"


def diff(cached: dict[str, Any], configured: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Fields that differ as ``(dotted name, cached value, configured value)``; a missing field is None."""
    a, b = _flatten(cached), _flatten(configured)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def describe_diff(cached: dict[str, Any], configured: dict[str, Any]) -> str:
    """``"sha256: cached 'ab..', configured 'cd..'; layer: cached 11, configured 10"``."""
    return "; ".join(f"{k}: cached {x!r}, configured {y!r}" for k, x, y in diff(cached, configured))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
