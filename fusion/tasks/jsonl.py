"""Reading task annotation files in JSON-lines format, with errors that say where and what was expected."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One JSON object of a JSON-lines file and where it came from, for error messages."""

    path: Path
    line: int
    data: Mapping[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path} line {self.line}"

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.where}: {message}")

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
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                # Without the newline, so the column in the message is on this line.
                data = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path} line {number}: expected a JSON object, got {type(data).__name__}")
            records.append(Record(path, number, data))
    if not records:
        raise ValueError(f"{path} holds no examples; expected {expected}")
    return records
