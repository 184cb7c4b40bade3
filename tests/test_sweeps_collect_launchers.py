"""mode=collect matches each sweep element to its own launcher log: submitit sweeps of several arrays (Optuna's
batches), submitit tasks that never made an element folder, and slurm/array.sbatch elements that failed before
Hydra started or were killed."""

import csv
import json
from pathlib import Path

import yaml

from fusion.sweeps.collect import collect


def _element(sweep: Path, job: str, job_id: str | None, metrics: dict | None, encoders=("clip",)) -> Path:
    folder = sweep / job
    (folder / ".hydra").mkdir(parents=True)
    config = {"seed": 0, "encoder": {e: {"_target_": "x"} for e in encoders}, "monitor": {"metric": "val/acc"}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra_job = {"num": int(job), **({"id": job_id} if job_id else {})}
    hydra = {"hydra": {"job": hydra_job, "runtime": {"choices": {"task": "shapes"}}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"training.lr={job}"]))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _submitit_log(sweep: Path, task_id: str, text: str) -> None:
    folder = sweep / ".submitit" / task_id
    folder.mkdir(parents=True)
    (folder / f"{task_id}_0_log.err").write_text(text)
    (folder / f"{task_id}_0_log.out").write_text("")


def test_a_sweep_of_several_submitit_arrays_gets_each_elements_own_log(tmp_path):
    # Optuna with n_jobs=4: trials 0-3 are array 100 (indices 0-3), trials 4-5 array 200 (indices 0-1).
    sweep = tmp_path / "sweep"
    ids = ["100_0", "100_1", "100_2", "100_3", "200_0", "200_1"]
    for job, job_id in enumerate(ids):
        failed = job in (1, 5)
        _element(sweep, str(job), job_id, None if failed else {"val/acc": 0.1 * job})
        _submitit_log(sweep, job_id, f"RuntimeError: trial {job} diverged\n" if failed else "Epoch 1: done\n")
    # A task of a third batch that died before Hydra made its folder.
    _submitit_log(sweep, "300_0", "Traceback (most recent call last):\nModuleNotFoundError: No module named 'x'\n")
    (sweep / ".submitit" / "%j").mkdir()  # submitit leaves its unformatted folder, empty: not a job
    (sweep / ".submitit" / "200").mkdir()  # nor is an array's own folder, with its submission script
    (sweep / ".submitit" / "200" / "200_submission.sh").write_text("#!/bin/bash\n")

    elements = collect(sweep)
    by_job = {e.job: e for e in elements}
    assert [e.job for e in elements] == ["0", "1", "2", "3", "4", "5", ".submitit/300_0"]
    # Job 1 is index 1 of array 100, not of array 200 (whose index 1 is job 5): each its own error.
    assert "trial 1 diverged" in by_job["1"].error and "100_1_0_log.err" in by_job["1"].error
    assert "trial 5 diverged" in by_job["5"].error and "200_1_0_log.err" in by_job["5"].error
    assert "No module named 'x'" in by_job[".submitit/300_0"].error
    assert [e.launcher_id for e in elements] == [*ids, "300_0"]
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok", "ok", "failed", "failed"]
    md = (sweep / "results.md").read_text()
    assert "| .submitit/300_0 | ? | ? |" in md and "| ? |" not in md.split("## Failed")[0]  # not in the grid


def test_without_a_recorded_job_id_only_an_unambiguous_index_is_used(tmp_path):
    sweep = tmp_path / "sweep"
    _element(sweep, "1", None, None)
    _submitit_log(sweep, "100_1", "RuntimeError: from array 100\n")
    _submitit_log(sweep, "200_1", "RuntimeError: from array 200\n")
    element = collect(sweep)[0]
    assert element.job == "1" and "array" not in element.error  # two arrays have an index 1: neither is taken


def test_array_sbatch_elements_failed_before_hydra_or_killed_are_explained(tmp_path):
    sweep = tmp_path / "logs" / "train" / "array" / "77"
    slurm = tmp_path / "logs" / "slurm"
    slurm.mkdir(parents=True)
    _element(sweep, "0", None, {"val/acc": 0.5, "test/acc": 0.4})
    # Element 1: a bad override on its line of the sweep file; Hydra stops before making .hydra/.
    bad = sweep / "1"
    bad.mkdir(parents=True)
    (bad / "slurm_overrides.txt").write_text("+experiment=shapes\nencoder=[clip,dino]\nfusion.nope=1\nlogger=csv\n")
    (slurm / "77_1.out").write_text(
        "element 1 (restart 0): +experiment=shapes encoder=[clip,dino] fusion.nope=1 -> ...\n"
        "Could not override 'fusion.nope'.\nTo append to your config use +fusion.nope=1\n"
        "Key 'nope' is not in struct\n    full_key: fusion.nope\n    object_type=dict\n\n"
        "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
        "srun: error: node1: task 0: Exited with exit code 1\n"
    )
    (bad / "slurm.out").symlink_to(slurm / "77_1.out")
    # Element 2: killed at its time limit while training; only SLURM's output says so.
    killed = _element(sweep, "2", None, None)
    (killed / "checkpoints").mkdir()
    (killed / "train.log").write_text("[fusion.run.commands][INFO] - resuming from ...\n")
    (slurm / "77_2.out").write_text("Epoch 3: 40%\nslurmstepd: error: *** JOB 80 ON node1 CANCELLED AT "
                                    "2026-11-25T07:00:00 DUE TO TIME LIMIT ***\n")
    (killed / "slurm.out").symlink_to(slurm / "77_2.out")
    # Element 3: the command-line check of train.py refused an encoder.
    refused = sweep / "3"
    refused.mkdir()
    (refused / "slurm_overrides.txt").write_text("+experiment=shapes\nencoder=[nope]\n")
    (slurm / "77_3.out").write_text("error: unknown encoder 'nope' in 'encoder=[nope]'; available: clip, dino\n")
    (refused / "slurm.out").symlink_to(slurm / "77_3.out")

    elements = collect(sweep)
    assert [(e.job, e.ok) for e in elements] == [("0", True), ("1", False), ("2", False), ("3", False)]
    assert (elements[1].task, elements[1].encoders) == ("shapes", "clip+dino")
    assert elements[1].overrides == ["+experiment=shapes", "encoder=[clip,dino]", "fusion.nope=1", "logger=csv"]
    # Hydra's message, not the lines around it (srun's "Exited with exit code 1", the element's echo).
    assert elements[1].error == "Hydra: Could not override 'fusion.nope'. (1/slurm.out)"
    assert "DUE TO TIME LIMIT" in elements[2].error and "slurm.out" in elements[2].error
    assert "unknown encoder 'nope'" in elements[3].error
    md = (sweep / "results.md").read_text()
    assert "1 of 4 elements finished" in md


def test_the_message_of_a_hydra_config_error_is_the_reason():
    from fusion.sweeps.collect import _last_error

    # What `train.py fusion=nope` prints (Hydra 1.3): no traceback, the options list after the message.
    text = ("In 'train': Could not find 'fusion/nope'\n\nAvailable options in 'fusion':\n\tgated\n\ttoken_concat\n"
            "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf\n\n"
            "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n")
    assert _last_error(text) == "Hydra: In 'train': Could not find 'fusion/nope'"
    assert _last_error("Epoch 1\nall fine\n") is None
