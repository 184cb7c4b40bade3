"""A tiny trained shapes checkpoint for the analysis tests, trained once per test session (imported by them).

Two tiny encoders and a narrow fusion transformer, one epoch on 1000 generated images (~1.5 min on a busy
2-core CPU; validation accuracy ~0.45 against a question prior of ~0.3): enough for the
model to answer well above the image-blind baselines, which the analysis tests compare against.
"""

from __future__ import annotations

import json
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
TRAIN = ["trainer.max_epochs=1", "model.attention_stats=false", "+trainer.num_sanity_val_steps=0"]


def tiny_checkpoint(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(checkpoint, workdir)``: trains on first use in this session; ``workdir`` holds data and caches."""
    workdir = factory.getbasetemp() / "analysis_tiny"
    ckpt = workdir / "train" / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        workdir.mkdir(exist_ok=True)
        proc = run("train.py", [*COMMON, *TRAIN, f"hydra.run.dir={workdir / 'train'}"], workdir)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return ckpt, workdir


def run_mode(mode: str, ckpt: Path, workdir: Path, *extra: str) -> dict:
    """``python eval.py mode=<mode> ckpt_path=<ckpt> ...`` as a user runs it; returns its results.json."""
    out = workdir / f"eval_{mode}"
    proc = run("eval.py", [f"mode={mode}", f"ckpt_path={ckpt}", *COMMON, *extra, f"hydra.run.dir={out}"], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / mode / "results.json").read_text())
