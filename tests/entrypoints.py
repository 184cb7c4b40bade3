"""Running train.py / eval.py as a user does, for the task tests (imported by them, not a test file)."""

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The smallest run that still goes through every step: tiny encoders and text, two training batches.
FAST = [
    "encoder=[clip_tiny,dino_tiny]", "text=tiny", "logger=csv", "data.num_workers=0", "data.batch_size=4",
    "training.attention_stats=false", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
    "+trainer.num_sanity_val_steps=0", "+trainer.limit_train_batches=2",
]


def run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from ``tmp_path``, with data and caches kept below it."""
    env = dict(os.environ, FUSION_CACHE_DIR=str(tmp_path / "cache"), FUSION_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


@dataclass
class TrainedAndEvaluated:
    """Folders and outputs of :func:`train_then_eval`."""

    run: Path  # train.py's run folder (metrics.json, checkpoints/)
    out: Path  # eval.py's run folder (metrics.json, the prediction file)
    train: subprocess.CompletedProcess
    eval: subprocess.CompletedProcess

    @property
    def train_metrics(self) -> dict:
        return json.loads((self.run / "metrics.json").read_text())

    @property
    def eval_metrics(self) -> dict:
        return json.loads((self.out / "metrics.json").read_text())


def train_one_epoch(
    args: Sequence[str], run_dir: Path, tmp_path: Path, train_args: Sequence[str] = ()
) -> subprocess.CompletedProcess:
    """One epoch of ``train.py <args>`` into ``run_dir`` (``run_dir/checkpoints/last.ckpt``); it must succeed."""
    trained = run("train.py", [*args, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", *train_args], tmp_path)
    assert trained.returncode == 0, trained.stderr[-4000:]
    return trained


def train_then_eval(
    args: list[str], split: str, tmp_path: Path, train_args: Sequence[str] = (), eval_args: Sequence[str] = ()
) -> TrainedAndEvaluated:
    """One epoch of ``train.py <args>``, then ``eval.py <args>`` of its last checkpoint on ``split``; both must
    succeed (the assertion shows the end of the failing one's stderr)."""
    run_dir, out = tmp_path / "train_run", tmp_path / "eval_run"
    trained = train_one_epoch(args, run_dir, tmp_path, train_args)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    evaluated = run("eval.py", [*args, f"ckpt_path={ckpt}", f"split={split}", f"hydra.run.dir={out}", *eval_args],
                    tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    return TrainedAndEvaluated(run_dir, out, trained, evaluated)
