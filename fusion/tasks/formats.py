"""Reading task annotation files (JSON, JSON lines) with errors that name the file, the entry or line, the key
and what was expected; and checking the file-name patterns of a task's config."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.io import DataFormatError  # noqa: F401  (raised here; importers name it from here too)


def read_json(path: Path, what: str) -> Any:
    """Parse ``path``; a missing file or bad JSON fails naming the file, ``what`` it is and where it broke.

    A key that occurs twice in one JSON object is an error naming the file and the key: Python's json keeps
    the last value and silently drops the other (a GQA question, a VQA field).
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_unique_keys)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{what} not found: {path}") from err
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise DataFormatError(f"{path} ({what}) is not valid JSON: {err.msg} at {where}") from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} ({what}) is not UTF-8 text: {err}") from err
    except _DuplicateKey as dup:
        raise DataFormatError(
            f"{path} ({what}): key {dup.key!r} occurs twice in one JSON object{_lines_of_key(path, dup.key)}; "
            "expected each key once (a JSON reader keeps only one of the two)"
        ) from None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Called by the C parser for every object (millions in VQA's annotations): only a length check per object.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _lines_of_key(path: Path, key: str) -> str:
    """`` (lines a and b)`` where ``key`` occurs as a key in ``path``, if exactly twice (then they are the two
    occurrences for sure); else nothing. Only read when the error is raised."""
    pattern = re.compile(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:")
    text = Path(path).read_text(encoding="utf-8")
    found = [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]
    return f" (lines {found[0]} and {found[1]})" if len(found) == 2 else ""


def field(entry: Any, key: str, kind: type | tuple[type, ...], where: str, expected: str) -> Any:
    """``entry[key]`` if ``entry`` is an object holding a ``kind`` there, else an error naming ``where`` and ``key``."""
    if not isinstance(entry, Mapping):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise DataFormatError(f"{where}: missing key {key!r} (expected {expected})")
    value = entry[key]
    # bool is an int subclass; a true/false id is still a format error.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise DataFormatError(f"{where}: key {key!r} is {value!r}, expected {expected}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def check_pattern(name: str, pattern: str, **fields: Any) -> str:
    """Fail at construction, naming the option, if a file-name pattern has unknown or bad placeholders."""
    try:
        return pattern.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"{name}={pattern!r} is not a valid pattern: it may use {sorted(fields)} ({err!r})") from err


# ---- JSON lines ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One JSON object of a JSON-lines file and where it came from, for error messages."""

    path: Path
    line: int
    data: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path} line {self.line}"

    def error(self, message: str) -> DataFormatError:
        return DataFormatError(f"{self.where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str) -> Any:
        if key not in self.data:
            raise self.error(f"missing field {key!r} (fields present: {', '.join(sorted(self.data)) or 'none'})")
        return self.data[key]

    def field(self, key: str, kinds: type | tuple[type, ...] = str) -> Any:
        """The value of ``key``, which must exist and be of one of ``kinds`` (never a bool for int)."""
        value = self._get(key)
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        # JSON true/false load as bool, a subclass of int: never accept them as numbers.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            expected = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(f"{key} {value!r} is not {expected}")
        if isinstance(value, str) and not value.strip():
            raise self.error(f"{key} is empty")
        return value

    def choice(self, key: str, allowed: Collection[Any]) -> Any:
        """The value of ``key``, which must be one of ``allowed``."""
        value = self._get(key)
        # 1 == True in Python: compare types too, so a JSON true is not taken for the label 1.
        if not any(value == a and type(value) is type(a) for a in allowed):
            raise self.error(f"{key} {value!r} is not one of {', '.join(map(str, allowed))}")
        return value


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "a JSON object", list: "a JSON list"}


def read_json_lines(path: Path, expected: str) -> list[Record]:
    """Every non-blank line of ``path`` as a :class:`Record` (line numbers count blank lines too).

    ``expected`` says what the file should be, for the message when it is missing or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected {expected}")
    records = []
    # Bytes, decoded a line at a time: a text-mode reader decodes ahead in blocks, so its UnicodeDecodeError
    # would name neither the file nor the line.
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{path} line {number}: not UTF-8 text ({err.reason} at byte {err.start} of the line); "
                    f"expected {expected}"
                ) from None
            if not line.strip():
                continue
            try:
                # Without the newline, so the column in the message is on this line.
                data = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path} line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(data, dict):
                raise DataFormatError(f"{path} line {number}: expected a JSON object, got {type(data).__name__}")
            records.append(Record(path, number, data))
    if not records:
        raise DataFormatError(f"{path} holds no examples; expected {expected}")
    return records


def all_or_none(records: Sequence[Record], key: str) -> bool:
    """Whether the records have ``key``: every one of them (True) or none (False, e.g. an unlabelled test file).

    A file with ``key`` on some lines only fails, naming the first line without it: a label dropped from a
    labelled file must not make that example silently unlabelled.
    """
    having = [r for r in records if r.has(key)]
    if having and len(having) < len(records):
        lacking = next(r for r in records if not r.has(key))
        raise lacking.error(f"missing field {key!r} while other lines have one (e.g. line {having[0].line})")
    return bool(having)


def line_of(path: Path, key: str, value: str) -> str:
    """``"<path> line <n>"`` for the line of the JSON-lines file ``path`` whose ``key`` is ``value`` (compared as
    text), ``"<path> lines <n>, <m>"`` if several are (a repeated id); ``"<path>, <key> <value>"`` if none is.
    For error messages: it reads the file again.
    """
    lines = [rec.line for rec in read_json_lines(path, f"the file with {key} {value!r}")
             if str(rec.data.get(key)) == value]
    if not lines:
        return f"{path}, {key} {value!r}"
    if len(lines) == 1:
        return f"{path} line {lines[0]}"
    return f"{path} lines {', '.join(map(str, lines))}"
