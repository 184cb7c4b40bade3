"""What identifies a cache's features: the encoder's fingerprint plus the feature shape and dtype.

The folder of a cache is named from the encoder name and a short hash of this fingerprint, so caches of
different weights, layers, preprocessing or dtypes live side by side; the full fingerprint is also
stored in the cache's metadata and compared field by field when it is opened.
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

_DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "float32": "float32", "fp32": "float32"}


def normalize_dtype(dtype: str | np.dtype | torch.dtype) -> str:
    """``"fp16"``/``torch.float16``/``np.float16``... -> ``"float16"``; only float16 and float32 are allowed."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        name = np.dtype(dtype).name if not isinstance(dtype, torch.dtype) else name
    if name not in _DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not supported; use float16 (default) or float32")
    return _DTYPES[name]


def cache_fingerprint(encoder: Any, dtype: str | np.dtype | torch.dtype = "float16") -> dict[str, Any]:
    """``encoder.fingerprint()`` (name, source, weights sha256, layer, preprocessing) + T, D, dtype.

    Round-tripped through JSON so it compares equal to the copy read back from ``meta.json``.
    """
    fp = {
        **encoder.fingerprint(),
        "num_tokens": int(encoder.num_tokens),
        "embed_dim": int(encoder.embed_dim),
        "dtype": normalize_dtype(dtype),
        "format": FORMAT_VERSION,
    }
    return json.loads(json.dumps(fp))


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
