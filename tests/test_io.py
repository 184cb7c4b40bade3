"""fusion.io: the one atomic writer and its typed forms."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import matplotlib
import pytest
import yaml

from fusion import io

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def umask_022():
    """Run under umask 022 whatever the test runner's umask is, and restore it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def leftovers(folder: Path) -> list[str]:
    """Temp files the writer might have left beside its target."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_bytes_and_text_round_trip(tmp_path: Path) -> None:
    assert io.write_bytes(tmp_path / "b.bin", b"\x00\x01\xff") == tmp_path / "b.bin"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    io.write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert leftovers(tmp_path) == []


def test_json_round_trip_and_trailing_newline(tmp_path: Path) -> None:
    data = {"b": [1, 2.5, None], "a": {"x": "y"}}
    io.write_json(tmp_path / "d.json", data)
    text = (tmp_path / "d.json").read_text()
    assert json.loads(text) == data and text.endswith("\n")
    assert list(json.loads(text)) == ["b", "a"]  # key order kept unless sort_keys
    io.write_json(tmp_path / "s.json", data, sort_keys=True, indent=None)
    text = (tmp_path / "s.json").read_text()
    assert text == json.dumps(data, sort_keys=True)


def test_yaml_round_trip_keeps_key_order(tmp_path: Path) -> None:
    data = {"z": 1, "a": [1, 2], "m": {"k": "v"}}
    io.write_yaml(tmp_path / "c.yaml", data)
    text = (tmp_path / "c.yaml").read_text()
    assert yaml.safe_load(text) == data
    assert [line.split(":")[0] for line in text.splitlines() if not line.startswith((" ", "-"))] == ["z", "a", "m"]


def test_csv_with_fieldnames(tmp_path: Path) -> None:
    rows = [{"name": "a", "score": 1}, {"name": "b, c", "score": 2}]
    io.write_csv(tmp_path / "r.csv", rows, fieldnames=["name", "score"])
    text = (tmp_path / "r.csv").read_text()
    assert text.splitlines()[0] == "name,score"
    assert list(csv.DictReader(text.splitlines())) == [{"name": "a", "score": "1"}, {"name": "b, c", "score": "2"}]


def test_csv_without_fieldnames_writes_rows_as_given(tmp_path: Path) -> None:
    io.write_csv(tmp_path / "r.csv", [["h1", "h2"], [1, "x"], [2, "y"]])
    assert (tmp_path / "r.csv").read_text() == "h1,h2\n1,x\n2,y\n"


def test_file_gets_umask_permissions_not_0600(tmp_path: Path, umask_022) -> None:
    for write, name in ((lambda p: io.write_text(p, "x"), "t.txt"), (lambda p: io.write_json(p, {}), "j.json")):
        path = write(tmp_path / name)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_umask_is_respected_when_stricter(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = io.write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_failing_writer_leaves_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = io.write_text(tmp_path / "keep.txt", "old contents\n")

    def half_then_fail(f) -> None:
        f.write(b"half of the new")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        io.atomic_write(target, half_then_fail)
    assert target.read_text() == "old contents\n"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_failing_writer_of_a_new_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        io.write_json(tmp_path / "bad.json", {"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    io.write_text(tmp_path / "f.txt", "a long first version\n")
    io.write_text(tmp_path / "f.txt", "short\n")
    assert (tmp_path / "f.txt").read_text() == "short\n"
    assert leftovers(tmp_path) == []


def test_parent_folders_are_created(tmp_path: Path) -> None:
    path = io.write_json(tmp_path / "a" / "b" / "c" / "d.json", [1])
    assert json.loads(path.read_text()) == [1]


def test_accepts_str_paths(tmp_path: Path) -> None:
    path = io.write_text(str(tmp_path / "s.txt"), "x")
    assert isinstance(path, Path) and path.read_text() == "x"


def test_save_figure_writes_png_and_leaves_figure_open(tmp_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    try:
        path = io.save_figure(fig, tmp_path / "plots" / "line.png")
        assert path.read_bytes()[:8] == PNG_MAGIC
        assert plt.fignum_exists(fig.number)
        assert leftovers(path.parent) == []
    finally:
        plt.close(fig)


def test_data_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="expected"):
        raise io.DataFormatError("x.json: expected a list")
