"""A tiny trained shapes checkpoint for the analysis tests, trained once per test session (imported by them).

Two tiny encoders and a narrow fusion transformer, one epoch on 1000 generated images (~1.5 min on a busy
2-core CPU; validation accuracy ~0.45 against a question prior of ~0.3): enough for the
model to answer well above the image-blind baselines, which the analysis tests compare against.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from entrypoints import run

ENCODERS = ["clip_tiny", "dino_tiny"]
# Shared by training and every analysis run: the same data, encoders and model shape.
COMMON = [
    "+experiment=shapes", f"encoder=[{','.join(ENCODERS)}]", "text=tiny", "logger=csv",
    "task.num_train=1000", "task.num_val=100", "task.num_test=50",
    "data.num_workers=0", "data.batch_size=32", "data.eval_batch_size=100",
    "fusion.width=64", "fusion.depth=2", "fusion.num_heads=2",
]
TRAIN = ["trainer.max_epochs=1", "training.attention_stats=false", "+trainer.num_sanity_val_steps=0"]


def tiny_checkpoint(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(checkpoint, workdir)``: trains on first use in this session; ``workdir`` holds data and caches."""
    workdir = factory.getbasetemp() / "analysis_tiny"
    ckpt = workdir / "train" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        workdir.mkdir(exist_ok=True)
        proc = run("train.py", [*COMMON, *TRAIN, f"hydra.run.dir={workdir / 'train'}"], workdir)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return ckpt, workdir


def run_mode(mode: str, ckpt: Path, workdir: Path, *extra: str, name: str | None = None) -> dict:
    """``python eval.py mode=<mode> ckpt_path=<ckpt> ...`` as a user runs it, into ``workdir/<name>`` (default
    ``eval_<mode>``); returns its results.json, read with a strict parser (no bare NaN or Infinity)."""
    out = workdir / (name or f"eval_{mode}")
    proc = run("eval.py", [f"mode={mode}", f"ckpt_path={ckpt}", *COMMON, *extra, f"hydra.run.dir={out}"], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return strict_json((out / mode / "results.json").read_text())


def strict_json(text: str) -> dict:
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (Python accepts them; JSON does not)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _csv_text(columns: list, rows: list) -> str:
    """What ``Report.table`` writes for these columns and rows (None: an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return buffer.getvalue()


def check_wandb(run_dir: Path, mode: str) -> dict:
    """The run's one offline wandb run (``logger=wandb``, WANDB_MODE=offline) holds every table and figure of the
    report folder ``run_dir/<mode>``: ``analysis/<mode>/table/<name>`` with the CSV's columns and rows, and
    ``analysis/<mode>/<name>`` with the PNG's bytes. Returns the run's summary (``wandb leet inspect``)."""
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, offline
    wandb = Path(sys.executable).parent / "wandb"
    proc = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", str(offline[0])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)["summary"]
    folder, files = run_dir / mode, offline[0] / "files"
    tables, figures = sorted(folder.glob("*.csv")), sorted(folder.glob("*.png"))
    assert tables and figures
    for path in tables:
        entry = summary[f"analysis/{mode}/table/{path.stem}"]
        assert entry["_type"] == "table-file", entry
        table = json.loads((files / entry["path"]).read_text())
        assert _csv_text(table["columns"], table["data"]) == path.read_text(), path.name
    for path in figures:
        entry = summary[f"analysis/{mode}/{path.stem}"]
        assert entry["_type"] == "images/separated" and entry["count"] == 1, entry
        assert (files / entry["filenames"][0]).read_bytes() == path.read_bytes(), path.name
    # Nothing else under the mode's key: every logged table and figure is one of the report's.
    logged = {k for k in summary if k.startswith(f"analysis/{mode}/")}
    expected = {f"analysis/{mode}/table/{p.stem}" for p in tables} | {f"analysis/{mode}/{p.stem}" for p in figures}
    assert logged == expected
    return summary


def eval_metrics(ckpt: Path, workdir: Path, split: str = "val") -> dict:
    """metrics.json of plain ``python eval.py ckpt_path=<ckpt> split=<split>`` (run once per session and split)."""
    out = workdir / f"eval_{split}"
    if not (out / "metrics.json").is_file():
        proc = run("eval.py", [f"ckpt_path={ckpt}", *COMMON, f"split={split}", f"hydra.run.dir={out}"], workdir)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())
