"""eval.py mode=collect: a sweep's metrics.json in one table, failed elements reported with their reason."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from entrypoints import run

from fusion.sweeps.collect import collect

TINY = [
    "+experiment=shapes", "logger=csv", "task.num_train=12", "task.num_val=4", "task.num_test=4",
    "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=1", "fusion.width=32", "fusion.depth=1",
    "fusion.num_heads=2", "training.attention_stats=false", "callbacks.progress=null",
]


def test_a_real_sweep_with_a_failing_element_is_collected(tmp_path):
    logs = tmp_path / "logs"
    # The second element names an encoder the model does not have: it fails, the sweep goes on.
    proc = run("train.py", ["-m", *TINY, "encoder=[clip_tiny]", "training.drop_encoders=[],[vit_tiny]",
                            f"paths.log_dir={logs}"], tmp_path)
    assert proc.returncode != 0
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    proc = run("eval.py", ["mode=collect", f"sweep_dir={sweep}", f"paths.log_dir={logs}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["job"], r["status"], r["task"], r["encoders"]) for r in rows] == [
        ("0", "ok", "shapes", "clip_tiny"), ("1", "failed", "shapes", "clip_tiny")]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert float(rows[0]["test/acc"]) == pytest.approx(metrics["test/acc"])
    assert "drop_encoders names ['vit_tiny']" in rows[1]["error"] and "train.log" in rows[1]["error"]

    md = (sweep / "results.md").read_text()
    assert "1 of 2 elements finished" in md and "| task | clip_tiny |" in md
    assert f"| shapes | {metrics['test/acc']:.4f} (1 failed) |" in md
    assert "| 1 | shapes | clip_tiny | training.drop_encoders=[vit_tiny] | ValueError(" in md
    assert (sweep / "results.png").stat().st_size > 1000
    assert "sweep element 1 (shapes, clip_tiny) failed" in proc.stdout + proc.stderr


def _element(root: Path, job: str, task: str, encoders: list[str], seed: int, metrics: dict | None) -> Path:
    folder = root / job
    (folder / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "encoder": {e: {"_target_": "x"} for e in encoders}, "monitor": {"metric": "val/acc"}}
    (folder / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {"hydra": {"job": {"num": int(job)}, "runtime": {"choices": {"task": task}}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}", f"task={task}"]))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_seeds_average_and_killed_elements_are_explained(tmp_path):
    sweep = tmp_path / "sweep"
    _element(sweep, "0", "vqav2", ["clip", "dino"], 0, {"val/acc": 0.5, "test/acc": 0.6})
    _element(sweep, "1", "vqav2", ["clip", "dino"], 1, {"val/acc": 0.5, "test/acc": 0.8})
    _element(sweep, "2", "gqa", ["clip"], 0, {"val/acc": 0.3})
    killed = _element(sweep, "3", "gqa", ["dino"], 0, None)
    (killed / "checkpoints").mkdir()
    (killed / "train.log").write_text("[2026][fusion.run.commands][INFO] - resuming from ...\n")
    # What SLURM writes into the array task's stderr when the time limit kills it (submitit's file name).
    err = sweep / ".submitit" / "81_3" / "81_3_0_log.err"
    err.parent.mkdir(parents=True)
    err.write_text("Epoch 3: 40%\nslurmstepd: error: *** JOB 84 ON node1 CANCELLED AT 2026-11-25T07:00:00 DUE TO "
                   "TIME LIMIT ***\n")
    _element(sweep, "4", "gqa", ["vit"], 0, None)  # never started: no log anywhere

    elements = collect(sweep, tmp_path / "out")
    assert [e.ok for e in elements] == [True, True, True, False, False]
    assert "DUE TO TIME LIMIT" in elements[3].error and "81_3_0_log.err" in elements[3].error
    assert "never started" in elements[4].error
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| task | clip | dino | vit | clip+dino |" in md  # subsets by size, then name
    assert "| vqav2 | – | – | – | 0.7000 ± 0.1414 (n=2) |" in md  # test/acc preferred, mean ± std over seeds
    assert "| gqa | 0.3000 | failed (1) | failed (1) | – |" in md  # val/acc where there is no test metric
    assert "| 3 | gqa | dino | task=gqa |" not in md  # overrides shown are the element's own
    assert (tmp_path / "out" / "results.png").is_file()


def test_collect_names_a_missing_or_empty_sweep(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        collect(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no sweep elements"):
        collect(tmp_path)
