"""2-process CPU DDP (gloo) through torchrun, no SLURM needed: the metrics, per-type accuracies, attention and
fuser statistics of a checkpoint evaluated by two processes equal those of one process (so the torchmetrics
states and the statistics are reduced across ranks), and a DDP run writes each of its files once, from rank 0.

torchrun starts every rank with the same command, as srun does in slurm/train.sbatch; Lightning finds the
ranks in the environment (TorchElasticEnvironment; SLURMEnvironment under srun). Each rank runs Hydra, and
``hydra.run.dir``'s default ends with ``${now:...}``, which each rank resolves for itself: ranks started a
second apart would get two run folders. So the run folder is given explicitly, as train.sbatch does.
The same evaluation through Lightning's own launcher (one process started, ``trainer.devices=2``) is checked too.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# 32/4/9 shapes images, three questions each: 96 train, 12 val and 27 test questions. 27 does not split evenly
# over two ranks: Lightning's own DistributedSampler(shuffle=False) would pad rank 1's share with the first
# question (counted twice by the metrics); fusion's EvalShardSampler gives rank 0 14 questions (four batches
# of 4, the last of 2) and rank 1 13 (the last batch of 1), so the ranks run as many batches but not as many
# examples, and the metrics must still equal one process's. (The loss is averaged per sample.)
NUM_TEST = 27
TINY = [
    "+experiment=shapes", "encoder=[clip_tiny,dino_tiny]", "fusion=gated", "task.num_train=32", "task.num_val=4",
    "task.num_test=9", "data.batch_size=4", "data.num_workers=0", "fusion.width=32", "fusion.depth=1",
    "fusion.num_heads=2", "fusion.dropout=0.0", "training.lr=3e-3",
]
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp"]
EPOCHS = 4


def _env(tmp: Path) -> dict:
    return dict(os.environ, FUSION_DATA_DIR=str(tmp / "data"), FUSION_CACHE_DIR=str(tmp / "cache"),
                FUSION_LOG_DIR=str(tmp / "logs"))


def _run(tmp: Path, script: str, args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    proc = subprocess.run([*launcher, str(ROOT / script), *args], cwd=tmp, env=_env(tmp), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    if processes > 1:  # really two processes in one process group
        assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A DDP training run (logged to csv and offline wandb), then its best checkpoint evaluated on the test
    split by one process and by two."""
    tmp = tmp_path_factory.mktemp("ddp")
    logs = tmp / "logs"
    train = logs / "ddp_train"
    _run(tmp, "train.py", [*TINY, *DDP, "logger=[csv,wandb]", f"trainer.max_epochs={EPOCHS}",
                           "callbacks.progress=null", f"hydra.run.dir={train}"], processes=2)
    (best,) = (train / "checkpoints").glob("epoch_*.ckpt")
    common = [*TINY, "split=test", f"ckpt_path={best}"]
    _run(tmp, "eval.py", [*common, f"hydra.run.dir={logs / 'eval_one'}"])
    _run(tmp, "eval.py", [*common, *DDP, f"hydra.run.dir={logs / 'eval_two'}"], processes=2)
    # Lightning's own launcher: started as one process, it starts rank 1 itself and hands it rank 0's run
    # folder, so here the default ${now:...} folder is fine.
    proc = _run(tmp, "eval.py", [*common, *DDP])
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr + proc.stdout
    (launched,) = (logs / "eval" / "runs").iterdir()  # one folder: rank 1 made none of its own
    return {"tmp": tmp, "logs": logs, "train": train, "one": logs / "eval_one", "two": logs / "eval_two",
            "launched": launched}


def _csv_rows(run: Path) -> list[dict[str, str]]:
    (version,) = (run / "csv").iterdir()  # one logger folder: version_0, no second one from rank 1
    assert version.name == "version_0"
    return list(csv.DictReader((version / "metrics.csv").open()))


def _logged_test_values(run: Path) -> dict[str, float]:
    """The test row of the csv logger (one row: logged once, by rank 0)."""
    rows = [r for r in _csv_rows(run) if r.get("test/acc")]
    assert len(rows) == 1, rows
    return {k: float(v) for k, v in rows[0].items() if k.startswith("test/") and v != ""}


def _assert_close(a: dict[str, float], b: dict[str, float]) -> None:
    assert set(a) == set(b)
    bad = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6)}
    assert not bad, bad


@pytest.mark.parametrize("launcher", ["two", "launched"], ids=["torchrun", "lightning"])
def test_two_processes_report_the_single_process_metrics_and_statistics(runs, launcher):
    one, two = runs["one"], runs[launcher]
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (one, two))
    # Accuracy, the per-question-type accuracies, the loss and the majority baseline.
    keys = {"test/acc", "test/acc_color", "test/acc_shape", "test/acc_count", "test/acc_position", "test/loss"}
    assert keys <= set(m1)
    _assert_close(m1, m2)
    # Every logged scalar, the attention masses (test/attn/...) and fuser weights (test/fuser/...) included.
    logged1, logged2 = _logged_test_values(one), _logged_test_values(two)
    assert any(k.startswith("test/attn/") for k in logged1) and any(k.startswith("test/fuser/") for k in logged1)
    _assert_close(logged1, logged2)
    # The statistics files: (query, layer, head, group) masses and the fuser's per-encoder weights.
    a1, a2 = (json.loads((r / "attention" / "test" / "attention.json").read_text()) for r in (one, two))
    assert a1["groups"] == a2["groups"]
    for query in ("cls", "text"):
        torch.testing.assert_close(torch.tensor(a1[query]), torch.tensor(a2[query]), rtol=1e-5, atol=1e-6)
    f1, f2 = (json.loads((r / "attention" / "test" / "fuser_weights.json").read_text()) for r in (one, two))
    torch.testing.assert_close(torch.tensor(f1["weights"]), torch.tensor(f2["weights"]), rtol=1e-5, atol=1e-6)
    # The prediction file holds every rank's rows, once each, in the split's order.
    p1, p2 = (json.loads((r / "predictions.json").read_text()) for r in (one, two))
    assert len(p1) == NUM_TEST and p2 == p1


def test_rank_zero_alone_would_have_reported_other_values(runs):
    """The comparison above can fail: rank 0's share (every other test question) alone scores differently, so
    equal values mean the ranks' states were reduced, not that each rank happened to see the same."""
    (data,) = (runs["tmp"] / "data" / "shapes").iterdir()
    questions = json.loads((data / "test_questions.json").read_text())
    predictions = json.loads((runs["one"] / "predictions.json").read_text())
    assert [q["question_id"] for q in questions] == [p["question_id"] for p in predictions]
    hits = [(q["answer_type"], p["answer"] == q["answer"]) for q, p in zip(questions, predictions, strict=True)]

    def accuracies(pairs: list[tuple[str, bool]]) -> dict[str, float]:
        out = {"test/acc": sum(h for _, h in pairs) / len(pairs)}
        for kind in {t for t, _ in pairs}:
            of_kind = [h for t, h in pairs if t == kind]
            out[f"test/acc_{kind}"] = sum(of_kind) / len(of_kind)
        return out

    full, rank0 = accuracies(hits), accuracies(hits[0::2])
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    _assert_close({k: metrics[k] for k in full}, full)
    assert 0 < full["test/acc"] < 1, full  # a trained model, not all right or all wrong
    assert any(not math.isclose(full[k], rank0[k]) for k in rank0), (full, rank0)


def test_a_ddp_run_writes_each_output_once_from_rank_zero(runs):
    logs, train, two = runs["logs"], runs["train"], runs["two"]
    # One run folder per run: rank 1 made no second one (e.g. from its own ${now:...}), nor lightning_logs/.
    assert sorted(p.name for p in logs.iterdir()) == ["ddp_train", "eval", "eval_one", "eval_two"]
    assert not (runs["tmp"] / "lightning_logs").exists()
    for run in (train, two, runs["launched"]):
        assert [p.relative_to(run) for p in run.rglob("metrics.json")] == [Path("metrics.json")]
        assert [p.name for p in run.rglob("config_resolved.yaml")] == ["config_resolved.yaml"]
        leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")]
        assert not leftovers, leftovers  # no half-written file left by a rank
    # Checkpoints: the best one and last.ckpt, no versioned duplicates (last-v1.ckpt) from a second writer.
    names = sorted(p.name for p in (train / "checkpoints").iterdir())
    assert len(names) == 2 and names[1] == "last.ckpt" and names[0].startswith("epoch_"), names
    assert not list(train.glob("hpc_ckpt_*.ckpt"))
    # The statistics files, once per split.
    for stage in ("val", "test"):
        files = sorted(p.name for p in (train / "attention" / stage).iterdir())
        assert files == sorted(["attention.csv", "attention.json", "attention_cls_heads.png",
                                "attention_cls_layers.png", "attention_text_heads.png", "attention_text_layers.png",
                                "fuser_weights.json", "fuser_weights.png"]), files
    # One csv logger folder with one row per logged step: validation once per epoch and once more for the best
    # checkpoint after fitting, test once.
    rows = _csv_rows(train)
    assert len([r for r in rows if r.get("val/acc")]) == EPOCHS + 1
    assert len([r for r in rows if r.get("test/acc")]) == 1
    steps = [(r["epoch"], r["step"]) for r in rows if r.get("train/loss")]
    assert len(steps) == len(set(steps))
    # Training accuracy once per epoch (a torchmetrics mean over both ranks' examples), a fraction of the 96.
    train_acc = [float(r["train/acc"]) for r in rows if r.get("train/acc")]
    assert len(train_acc) == EPOCHS and all(abs(a * 96 - round(a * 96)) < 1e-3 for a in train_acc), train_acc
    # One offline wandb run, the one whose id the run folder keeps for a requeued job.
    (wandb_run,) = (train / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith("-" + (train / "wandb_id").read_text().strip())
    # The evaluation's prediction file: one row per test question, none twice.
    predictions = json.loads((two / "predictions.json").read_text())
    assert len({p["question_id"] for p in predictions}) == len(predictions) == NUM_TEST


def test_interleave_restores_the_split_order_and_drops_the_sampler_padding():
    from torch.utils.data import DistributedSampler

    from fusion.data.distributed import EvalShardSampler, interleave

    for total, world in ((10, 2), (11, 2), (7, 3), (2, 4)):
        for sampler in (DistributedSampler, EvalShardSampler):
            kwargs = {"shuffle": False} if sampler is DistributedSampler else {}
            shares = [list(sampler(range(total), num_replicas=world, rank=r, **kwargs)) for r in range(world)]
            assert interleave(shares, total) == list(range(total))


def test_eval_shard_sampler_hands_each_example_to_exactly_one_rank():
    from fusion.data.distributed import EvalShardSampler

    for total, world in ((10, 2), (11, 2), (7, 3), (2, 4), (0, 2)):
        shares = [EvalShardSampler(range(total), num_replicas=world, rank=r) for r in range(world)]
        seen = [i for share in shares for i in share]
        assert sorted(seen) == list(range(total))  # no example twice, none left out
        assert [len(share) for share in shares] == [len(list(share)) for share in shares]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
