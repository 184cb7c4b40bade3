"""Launcher configs (SLURM, local submitit), their value checks, and the Optuna search, run as a user runs them."""

from pathlib import Path

import pytest
import yaml
from entrypoints import run
from hydra import compose, initialize_config_dir

from fusion.sweeps.launch_check import launcher_errors

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "+experiment=shapes", "encoder=[clip_tiny]", "logger=csv", "task.num_train=12", "task.num_val=4",
    "task.num_test=4", "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=1", "fusion.depth=1",
    "fusion.num_heads=2", "training.attention_stats=false", "callbacks.progress=null", "test=false",
]


def _launcher(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True).hydra.launcher


def test_slurm_launcher_values_are_overridable():
    launcher = _launcher(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=240",
                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
                          "hydra.launcher.nodes=2", "hydra.launcher.mem_gb=64", "hydra.launcher.array_parallelism=3",
                          "hydra.launcher.setup=[module load cuda]", "+hydra.launcher.qos=high"])
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node, launcher.nodes) == ("gpu", 240, 4, 2)
    assert (launcher.mem_gb, launcher.array_parallelism, list(launcher.setup)) == (64, 3, ["module load cuda"])
    assert launcher.qos == "high" and launcher.max_num_timeout == 0 and launcher.signal_delay_s == 90
    assert launcher_errors(launcher, known_partitions=["debug", "gpu"]) == []
    # The partition is checked against the cluster's own list (sinfo), whatever cluster this runs on.
    assert launcher_errors(launcher, known_partitions=["debug"]) == [
        "hydra.launcher.partition='gpu' is not a partition of this cluster: debug"
    ]
    assert launcher_errors(launcher, known_partitions=None) == []  # no cluster to ask: not checked
    assert _launcher(["hydra/launcher=local"])._target_.endswith("LocalLauncher")


def test_bad_launcher_values_are_named():
    errors = launcher_errors({"timeout_min": -5, "nodes": 0, "cpus_per_task": 2, "signal_delay_s": -1})
    assert errors == ["hydra.launcher.timeout_min=-5 must be a positive whole number",
                      "hydra.launcher.nodes=0 must be a positive whole number",
                      "hydra.launcher.signal_delay_s=-1 must be >= 0"]


def test_a_bad_value_stops_the_multirun_before_any_job(tmp_path):
    proc = run("train.py", ["-m", "hydra/launcher=slurm", "hydra.launcher.timeout_min=-5", *TINY,
                            f"paths.log_dir={tmp_path / 'logs'}"], tmp_path)
    assert proc.returncode != 0
    assert "bad SLURM launcher settings" in proc.stderr and "hydra.launcher.timeout_min=-5" in proc.stderr
    assert not list((tmp_path / "logs").rglob("metrics.json"))


def test_local_submitit_launcher_runs_the_sweep(tmp_path):
    logs = tmp_path / "logs"
    proc = run("train.py", ["-m", "hydra/launcher=local", *TINY, "fusion.width=32,64", f"paths.log_dir={logs}"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "1"]
    assert list(sweep.glob(".submitit/*/*_log.out"))  # each job ran as its own submitit process


@pytest.mark.parametrize("trials", [2])
def test_optuna_search_writes_the_best_parameters(tmp_path, trials):
    logs = tmp_path / "logs"
    # Not test=false: with it train() evaluates nothing and returns no metric to optimise.
    tiny = [a for a in TINY if a != "test=false"]
    proc = run("train.py", ["hparams_search=optuna", *tiny, f"hydra.sweeper.n_trials={trials}",
                            "hydra.sweeper.n_jobs=2", "fusion.width=choice(32,64)", f"paths.log_dir={logs}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"training.lr", "training.ve_dropout", "fusion.width"}
    assert 1e-4 <= best["best_params"]["training.lr"] <= 3e-3 and 0 <= best["best_params"]["training.ve_dropout"] <= 0.5
    assert 0.0 <= best["best_value"] <= 1.0
    assert len(list(sweep.glob("*/metrics.json"))) == trials
