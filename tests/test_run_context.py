"""fusion/run/context.py: one run's set-up and tear-down (seed, record, loggers, metrics.json, closing on failure)."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from fusion.run.context import METRICS, WANDB_ID, open_run, wandb_group
from fusion.run.record import RECORD, RecordMismatch

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out: Path, *overrides: str, config: str = "train", hydra: bool = False):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=["+experiment=shapes", f"paths.output_dir={out}", *overrides],
                      return_hydra_config=hydra)
    if hydra:
        HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture()
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)


def test_a_finished_body_writes_the_record_and_metrics_and_closes_its_loggers(tmp_path):
    out = tmp_path / "run"
    with open_run(_cfg(out, "logger=csv"), "train") as run:
        (logger,) = run.start_loggers()
        assert isinstance(logger, CSVLogger) and run.output_dir == out
        assert (out / RECORD).is_file()  # checked and written before the body builds anything
        assert run.finish({"val/acc": 0.5, "test/acc": 0.25}) == {"val/acc": 0.5, "test/acc": 0.25}
    assert run.loggers == []
    written = json.loads((out / METRICS).read_text())
    assert written == {"val/acc": 0.5, "test/acc": 0.25} and list(written) == ["test/acc", "val/acc"]  # sorted
    assert not (out / WANDB_ID).exists()  # no wandb logger: no id kept


def test_the_seed_is_applied(tmp_path):
    with open_run(_cfg(tmp_path / "run", "seed=7"), "eval", record=False):
        drawn = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(4))
    assert not (tmp_path / "run" / RECORD).exists()  # record=False: extract and the zoo keep no record


def test_a_failing_body_closes_its_loggers_marks_wandb_failed_and_writes_no_metrics(tmp_path, offline_wandb):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="diverged"), open_run(_cfg(out, "logger=wandb"), "train") as run:
        (logger,) = run.start_loggers()
        assert isinstance(logger, WandbLogger)
        raise RuntimeError("diverged")
    assert run.loggers == []
    experiment = logger.experiment
    assert experiment._is_finished and experiment._exit_code == 1  # failed, as wandb's own context manager marks it
    assert not (out / METRICS).exists()
    assert experiment.id == (out / WANDB_ID).read_text().strip()


def test_a_folder_of_another_training_config_is_refused_before_any_logger(tmp_path, offline_wandb):
    out = tmp_path / "run"
    with open_run(_cfg(out, "logger=csv"), "train"):
        pass
    with pytest.raises(RecordMismatch, match=r"training.lr: 0.001 vs 0.01"), \
            open_run(_cfg(out, "logger=wandb", "training.lr=0.01"), "train"):
        pytest.fail("the body of a refused run ran")
    assert not (out / WANDB_ID).exists() and not list(out.glob("wandb"))


def test_a_training_folder_keeps_its_wandb_run_and_an_evaluation_starts_a_new_one(tmp_path, offline_wandb):
    ids = {}
    for config in ("train", "eval"):
        cfg = _cfg(tmp_path / config, "logger=wandb", config=config)
        ids[config] = []
        for _ in range(2):  # the same folder twice: a requeued / resumed job, or an evaluation run again
            with open_run(cfg, config) as run:
                (logger,) = run.start_loggers()
                ids[config].append(logger.experiment.id)
            assert logger.experiment._exit_code == 0
    assert ids["train"][0] == ids["train"][1] == (tmp_path / "train" / WANDB_ID).read_text().strip()
    assert ids["eval"][0] != ids["eval"][1] and not (tmp_path / "eval" / WANDB_ID).exists()


def test_a_part_gets_its_own_folder_and_hyperparameters(tmp_path):
    with open_run(_cfg(tmp_path / "run", "logger=csv"), "zoo", record=False) as run:
        (logger,) = run.start_loggers(part="clip_tiny", hyperparams={"lr": 0.5})
        logger.save()
        run.close_loggers()
        assert run.loggers == []
    (hparams,) = (tmp_path / "run" / "clip_tiny").rglob("hparams.yaml")
    assert hparams.read_text() == "lr: 0.5\n"


def test_wandb_group_is_the_sweep_of_the_run(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    sweep = ["hydra.mode=MULTIRUN", "hydra.sweep.dir=/x/multiruns/2026-01-02_03-04-05"]
    _cfg(tmp_path, *sweep, hydra=True)
    assert wandb_group("shapes") == "sweep-2026-01-02_03-04-05"  # every job of one multirun, whatever its experiment
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    assert wandb_group("shapes") == "sweep-2026-01-02_03-04-05"  # submitit's array: still the multirun
    _cfg(tmp_path, hydra=True)  # a single run: an element of slurm/array.sbatch
    assert wandb_group("shapes") == "array-77"
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    assert wandb_group("shapes") == "shapes"
