"""On a real SLURM (tests/slurm/start_cluster.sh): a sweep as one job array, requeue on a signal with resume
in the same run folder and wandb run, and 2-process CPU DDP through srun."""

import csv
import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "logger=csv", "task.num_train=12", "task.num_val=4", "task.num_test=4", "data.num_workers=0",
    "data.batch_size=8", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2", "training.attention_stats=false",
    "callbacks.progress=null",
]


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, FUSION_DATA_DIR=str(tmp_path / "data"), FUSION_CACHE_DIR=str(tmp_path / "cache"),
                FUSION_LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable)


def _sbatch(tmp_path: Path, args: list[str], **env: str) -> str:
    (tmp_path / "logs" / "slurm").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/logs/slurm/%j.out", *args],
                          capture_output=True, text=True, env=dict(_env(tmp_path), **env), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _wandb_run(run_dir: Path) -> dict:
    """The ``run`` record (id, project, group...) of an offline wandb run, read back by wandb itself."""
    out = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return next(r["run"] for r in map(json.loads, out.stdout.splitlines()) if r.get("type") == "run")


def _wait_for_step(job: str, ckpt: Path, step: int, timeout: float = 600) -> None:
    """Until the run's step checkpoint has reached ``step`` (the job still pending or running)."""
    deadline = time.monotonic() + timeout
    while not (ckpt.is_file() and torch.load(ckpt, weights_only=True)["global_step"] >= step):
        assert time.monotonic() < deadline and _state(job) in ("PENDING", "RUNNING"), _state(job)
        time.sleep(0.5)


def _release_when_requeued(job: str, timeout: float = 300) -> None:
    """Once the job has left RUNNING (requeued: pending with a begin time), let it start again now."""
    deadline = time.monotonic() + timeout
    while _state(job) in ("RUNNING", "COMPLETING", "REQUEUED"):
        assert time.monotonic() < deadline, _state(job)
        time.sleep(1)
    assert _state(job) == "PENDING", _state(job)
    # slurmd refuses to launch a job it has just killed ("Job N already killed, do not launch batch job", the
    # attempt then FAILS) until it has cleaned up the killed attempt: released within a second of the requeue,
    # under load, it did. A few seconds is still far below the BeginTime delay the release skips.
    time.sleep(5)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)  # no BeginTime delay


def _resumed_step(log: str) -> int:
    (step,) = re.findall(r"resuming from \S+ \(step (\d+)\)", log)
    return int(step)


def _state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def _wait(job: str, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _state(job)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    raise TimeoutError(f"job {job} still {_state(job)} after {timeout} s")


def test_subset_sweep_is_one_job_array_and_collects_to_seven_rows(slurm_cluster, tmp_path):
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "+experiment=shapes_subsets", "hydra/launcher=slurm",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20", "hydra.launcher.partition=debug",
         "trainer.max_epochs=1", "+trainer.limit_train_batches=1", *TINY],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    tasks = [p.name.split("_") for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)]
    assert len({a for a, _ in tasks}) == 1 and sorted(int(i) for _, i in tasks) == list(range(7))  # one array of 7
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "mode=collect", f"sweep_dir={sweep}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert len(rows) == 7 and all(r["status"] == "ok" and r["test/acc"] for r in rows)
    assert len({r["encoders"] for r in rows}) == 7
    # Each element matched to its own array task by the job id Hydra recorded (<array job>_<index>).
    assert sorted(r["launcher_id"] for r in rows) == sorted("_".join(t) for t in tasks)


def test_optuna_search_runs_its_trials_as_slurm_jobs_and_collects_them(slurm_cluster, tmp_path):
    """hparams_search=optuna through hydra/launcher=slurm: each batch of trials (one here) is a SLURM job, the
    sweeper gets every trial's validation metric back, and collect matches each trial to its own job."""
    logs = tmp_path / "logs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "hparams_search=optuna", "+experiment=shapes", "encoder=[clip_tiny]",
         "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
         "hydra.launcher.partition=debug", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
         "fusion.width=choice(32,64)", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
         *(a for a in TINY if not a.startswith("fusion.width="))],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (logs / "train" / "multiruns").iterdir()
    # A batch of one trial is a plain job (<job id>), a larger batch an array (<array job>_<index>).
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name))
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs}) == 2  # two batches: two SLURM jobs
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"training.lr", "training.ve_dropout", "fusion.width"}
    assert 0.0 <= best["best_value"] <= 1.0
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "mode=collect", f"sweep_dir={sweep}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert sorted(r["launcher_id"] for r in rows) == jobs
    # The value the sweeper optimised is a trial's val/acc as its metrics.json has it.
    trial_values = [json.loads(m.read_text())["val/acc"] for m in sweep.glob("*/metrics.json")]
    assert best["best_value"] == pytest.approx(max(trial_values))


def test_plain_sbatch_array_elements_are_collected_with_failures_and_their_reason(slurm_cluster, tmp_path):
    sweep_file = tmp_path / "sweep.txt"
    trains = ["+experiment=shapes", "encoder=[clip_tiny]", *(a for a in TINY if a != "logger=csv"), "logger=wandb",
              "trainer.max_epochs=1", "+trainer.limit_train_batches=1"]
    sweep_file.write_text("+experiment=shapes fusion.nope=1 logger=csv\n+experiment=shapes encoder=[nope] logger=csv\n"
                          + " ".join(trains) + "\n")
    array = _sbatch(tmp_path, ["--array=0-2", "--cpus-per-task=1", str(ROOT / "slurm" / "array.sbatch")],
                    SWEEP=str(sweep_file))
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline
        time.sleep(1)
    sweep = tmp_path / "logs" / "train" / "array" / array
    for i in (0, 1):  # made by array.sbatch before the element started: Hydra never wrote .hydra/ here
        assert not (sweep / str(i) / ".hydra").exists()
        assert (sweep / str(i) / "slurm.out").resolve().parent == tmp_path / "logs" / "slurm"
    proc = subprocess.run([sys.executable, str(ROOT / "eval.py"), "mode=collect", f"sweep_dir={sweep}"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert [(r["job"], r["status"], r["task"], r["encoders"]) for r in rows] == [
        ("0", "failed", "shapes", "?"), ("1", "failed", "shapes", "nope"), ("2", "ok", "shapes", "clip_tiny")]
    assert rows[2]["test/acc"] and (sweep / "2" / "metrics.json").is_file()
    (run,) = (sweep / "2" / "wandb").glob("offline-run-*")
    assert _wandb_run(run)["run_group"] == f"array-{array}"  # the array's runs are one wandb group
    assert rows[0]["error"].startswith("Hydra: Could not override 'fusion.nope'.") and "slurm.out" in rows[0]["error"]
    assert rows[1]["error"].startswith("error: unknown encoder 'nope'")
    assert rows[0]["overrides"] == "+experiment=shapes fusion.nope=1 logger=csv"


def test_unknown_partition_is_refused_before_submitting(slurm_cluster, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=shapes", "hydra/launcher=slurm",
         "hydra.launcher.partition=nope", *TINY], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "hydra.launcher.partition='nope' is not a partition of this cluster: debug" in proc.stderr


def test_signalled_job_checkpoints_requeues_and_resumes_in_the_same_wandb_run(slurm_cluster, tmp_path):
    # 36 questions, batches of 8: 5 steps an epoch, 6 epochs; a step checkpoint every step.
    args = ["+experiment=shapes", "encoder=[clip_tiny]", *TINY, "logger=wandb", "task.num_train=12",
            "trainer.max_epochs=6", "callbacks.step_checkpoint.every_n_train_steps=1"]
    job = _sbatch(tmp_path, ["--cpus-per-task=1", str(ROOT / "slurm" / "train.sbatch"), *args])
    run = tmp_path / "logs" / "train" / "slurm" / job
    _wait_for_step(job, run / "checkpoints" / "last_step.ckpt", 3)
    # What SLURM sends before a time limit or preemption (--signal=USR1@90), to the job's processes.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    deadline = time.monotonic() + 300
    while _state(job) == "RUNNING":  # the job checkpoints, requeues itself and stops
        assert time.monotonic() < deadline
        time.sleep(1)
    requeued = torch.load(run / "checkpoints" / "last_requeue.ckpt", weights_only=True)["global_step"]
    assert 3 <= requeued < 30
    assert not (run / "metrics.json").exists()
    _release_when_requeued(job)
    assert _wait(job) == "COMPLETED", (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()[-3000:]

    log = (run / "train.log").read_text()
    assert f"requeueing SLURM job {job}" in log and f"resuming from {run / 'checkpoints'}" in log
    assert "training failed" not in log  # the loggers were finished before the requeue stopped the job
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 30  # the step count continued from the checkpoint, not from 0
    assert "test/acc" in json.loads((run / "metrics.json").read_text())
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one wandb run id
    assert runs[0].name.endswith((run / "wandb_id").read_text().strip())
    out = (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()
    assert "(restart 0)" in out and "(restart 1)" in out


def test_job_requeued_by_scontrol_while_training_resumes_from_its_step_checkpoint(slurm_cluster, tmp_path):
    """``scontrol requeue`` from outside (no signal beforehand: SIGTERM, then SIGKILL): the requeued job resumes
    from the newest step checkpoint; its step count continues and one wandb run id covers both attempts."""
    args = ["+experiment=shapes", "encoder=[clip_tiny]", *TINY, "logger=wandb", "trainer.max_epochs=6",
            "callbacks.step_checkpoint.every_n_train_steps=1"]
    job = _sbatch(tmp_path, ["--cpus-per-task=1", str(ROOT / "slurm" / "train.sbatch"), *args])
    run = tmp_path / "logs" / "train" / "slurm" / job
    _wait_for_step(job, run / "checkpoints" / "last_step.ckpt", 3)
    subprocess.run(["scontrol", "requeue", job], check=True)
    _release_when_requeued(job)
    assert _wait(job) == "COMPLETED", (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()[-3000:]

    log = (run / "train.log").read_text()
    assert 3 <= _resumed_step(log) < 30  # from the step checkpoint, not from 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    assert "test/acc" in json.loads((run / "metrics.json").read_text())
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {(run / "wandb_id").read_text().strip()}
    out = (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()
    assert "(restart 0)" in out and "(restart 1)" in out


def test_submitit_job_signalled_before_its_limit_requeues_and_the_sweep_gets_the_final_value(slurm_cluster, tmp_path):
    """hydra/launcher=slurm: on submitit's USR2 the callback checkpoints, requeues and ends the attempt without
    a result, so the launcher waits for the requeued attempt and returns its value (not an empty one)."""
    logs = tmp_path / "logs"
    sweep = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), "-m", "+experiment=shapes", "encoder=[clip_tiny]",
         "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
         "hydra.launcher.partition=debug", *(a for a in TINY if a != "logger=csv"), "logger=wandb",
         "trainer.max_epochs=6", "callbacks.step_checkpoint.every_n_train_steps=1"],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list((logs / "train" / "multiruns").glob("*/.submitit/[0-9]*")):
            assert time.monotonic() < deadline and sweep.poll() is None, sweep.stderr.read()[-3000:]
            time.sleep(0.5)
        (folder,) = (logs / "train" / "multiruns").glob("*/.submitit/[0-9]*")
        sweep_dir, job = folder.parents[1], folder.name
        run = sweep_dir / "0"
        _wait_for_step(job, run / "checkpoints" / "last_step.ckpt", 3)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what submitit asks SLURM for
        _release_when_requeued(job)
        _, err = sweep.communicate(timeout=900)
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, err[-3000:]

    log = (run / "train.log").read_text()
    assert f"requeueing SLURM job {job}" in log and 3 <= _resumed_step(log) < 30
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    metrics = json.loads((run / "metrics.json").read_text())
    # The launcher's result is the requeued attempt's return value: train.py's validation metric.
    status, returned = pickle.loads((folder / f"{job}_0_result.pkl").read_bytes())
    assert status == "success" and returned.return_value == pytest.approx(metrics["val/acc"])
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[1] for r in runs} == {(run / "wandb_id").read_text().strip()}
    assert _wandb_run(runs[-1])["run_group"] == f"sweep-{sweep_dir.name}"


def test_two_process_gloo_ddp_through_srun_reports_the_single_process_metrics(slurm_cluster, tmp_path):
    args = ["+experiment=shapes", "encoder=[clip_tiny]", *TINY, "trainer.max_epochs=1", "trainer.accelerator=cpu"]
    single = _sbatch(tmp_path, ["--cpus-per-task=1", str(ROOT / "slurm" / "train.sbatch"), *args])
    ddp = _sbatch(tmp_path, ["--ntasks-per-node=2", "--cpus-per-task=1", str(ROOT / "slurm" / "train.sbatch"),
                             *args, "+trainer.strategy=ddp"])
    for job in (single, ddp):
        assert _wait(job) == "COMPLETED", (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()[-3000:]
    runs = tmp_path / "logs" / "train" / "slurm"
    one = json.loads((runs / single / "metrics.json").read_text())
    two = json.loads((runs / ddp / "metrics.json").read_text())
    # Training with 2 processes doubles the effective batch, so its values differ: the names must not.
    assert set(two) == set(one) and "test/acc" in two
    _assert_two_ranks(tmp_path, ddp)
    # Rank 0 alone wrote the DDP run's files: one metrics.json, one csv logger folder, two checkpoints.
    assert [p.relative_to(runs / ddp) for p in (runs / ddp).rglob("metrics.json")] == [Path("metrics.json")]
    assert [p.name for p in (runs / ddp / "csv").iterdir()] == ["version_0"]
    assert len(list((runs / ddp / "checkpoints").iterdir())) == 2

    # Values: the single-process run's best checkpoint evaluated by 1 and by 2 srun tasks gives the same
    # metrics and attention statistics. 4 test images, 3 questions each: 12 questions, 6 per rank, so
    # Lightning's DistributedSampler adds no padding (duplicated examples) to either rank's share.
    (best,) = (runs / single / "checkpoints").glob("epoch_*.ckpt")
    evals = ["+experiment=shapes", "encoder=[clip_tiny]", *[a for a in TINY if not a.startswith("callbacks.")],
             "training.attention_stats=true", "trainer.accelerator=cpu", "split=test", f"ckpt_path={best}"]
    eval_one = _sbatch(tmp_path, ["--cpus-per-task=1", str(ROOT / "slurm" / "eval.sbatch"), *evals])
    eval_two = _sbatch(tmp_path, ["--ntasks-per-node=2", "--cpus-per-task=1", str(ROOT / "slurm" / "eval.sbatch"),
                                  *evals, "+trainer.strategy=ddp"])
    for job in (eval_one, eval_two):
        assert _wait(job) == "COMPLETED", (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()[-3000:]
    _assert_two_ranks(tmp_path, eval_two)
    folders = [tmp_path / "logs" / "eval" / "slurm" / job for job in (eval_one, eval_two)]
    m1, m2 = (json.loads((f / "metrics.json").read_text()) for f in folders)
    assert set(m1) == set(m2) and "test/acc" in m1
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    a1, a2 = (json.loads((f / "attention" / "test" / "attention.json").read_text()) for f in folders)
    for query in ("cls", "text"):
        torch.testing.assert_close(torch.tensor(a2[query]), torch.tensor(a1[query]), rtol=1e-5, atol=1e-6)
    p1, p2 = (json.loads((f / "predictions.json").read_text()) for f in folders)
    assert len(p1) == 12 and p2 == p1  # every rank's rows, once each, in the split's order


def _assert_two_ranks(tmp_path: Path, job: str) -> None:
    out = (tmp_path / "logs" / "slurm" / f"{job}.out").read_text()
    assert "world_size: 2" in out or "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out, out[-3000:]


@pytest.fixture(autouse=True)
def _no_leftover_jobs(slurm_cluster):
    yield
    mine = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    for job in mine:  # this test's jobs only: the cluster is the tests' own
        subprocess.run(["scancel", job])
