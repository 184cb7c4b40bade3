"""Files: the one way fusion writes a file, and the error for a file that is not in its expected format.

Every file a run, an analysis, a study or a cache build leaves behind is written through
:func:`atomic_write` (or one of its typed forms): the bytes go to a uniquely named temp file beside the
target, are flushed and ``fsync``-ed, and the temp file is renamed over the target, so a reader (another
rank, a collecting sweep, a resumed job) sees the old file or the whole new one, never half of one. The
file gets the usual permissions of the process umask (0644 by default; ``mkstemp`` would give 0600 and
hide results from the rest of a group). The parent folder is created when missing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import yaml


class DataFormatError(ValueError):
    """A data or config file is not in its expected format; the message names the file and what was expected."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` through ``write(f)`` on a temp file beside it, synced, then renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "xb" (not mkstemp): the file gets the umask's permissions, not 0600, and
    # two writers of the same file never share a temp file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a trailing newline when indented)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys)
    return write_text(path, text + "\n" if indent is not None else text)


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` (plain Python values) as YAML to ``path`` atomically, keys in their given order."""
    return write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]] | Iterable[Sequence[Any]],
    fieldnames: Sequence[str] | None = None,
) -> Path:
    """Write ``rows`` as CSV to ``path`` atomically: dicts under ``fieldnames`` (a header line), or plain
    rows as they are (their header, if any, is the first row)."""
    buffer = io.StringIO()
    if fieldnames is not None:
        writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)  # type: ignore[arg-type]
    else:
        csv.writer(buffer, lineterminator="\n").writerows(rows)  # type: ignore[arg-type]
    return write_text(path, buffer.getvalue())


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure (format from the suffix) to ``path`` atomically; the figure stays open."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))
