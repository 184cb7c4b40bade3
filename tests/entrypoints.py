"""Running train.py / eval.py as a user does, for the task tests (imported by them, not a test file)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The smallest run that still goes through every step: tiny encoders and text, two training batches.
FAST = [
    "encoder=[clip_tiny,dino_tiny]", "text=tiny", "logger=csv", "data.num_workers=0", "data.batch_size=4",
    "model.attention_stats=false", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
    "+trainer.num_sanity_val_steps=0", "+trainer.limit_train_batches=2",
]


def run(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from ``tmp_path``, with data and caches kept below it."""
    env = dict(os.environ, FUSION_CACHE_DIR=str(tmp_path / "cache"), FUSION_DATA_DIR=str(tmp_path / "data"))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
