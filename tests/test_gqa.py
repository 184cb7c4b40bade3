"""GQA: the loader on small data in the official format, metric, errors, train + eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from fusion.tasks.formats import DataFormatError
from fusion.tasks.gqa import GQATask

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"n1": "red", "n2": "blue", "n3": "green", "n11": "red", "n12": "blue", "n21": "green"}
RGB = {"red": (220, 0, 0), "blue": (0, 0, 220), "green": (0, 200, 0)}


def _questions(image_id: str) -> list[tuple[str, str, str]]:
    """(question, answer, structural type) about a flat-coloured image."""
    color = COLORS[image_id]
    return [
        ("What color is the image?", color, "query"),
        ("Is the image red?", "yes" if color == "red" else "no", "verify"),
        ("Is the image red or blue?", color if color in ("red", "blue") else "neither", "choose"),
        ("Is it red and dark?", "no", "logical"),
    ]


def write_gqa(root: Path) -> Path:
    """12 train questions on 3 images, 6 val and 2 testdev on 2, 2 unanswered submission questions."""
    layout = {"train": (["n1", "n2", "n3"], 4), "val": (["n11", "n12"], 3), "testdev": (["n11"], 2)}
    (root / "images").mkdir(parents=True)
    for image_id, color in COLORS.items():
        Image.new("RGB", (40, 40), RGB[color]).save(root / "images" / f"{image_id}.jpg")
    for split, (image_ids, per_image) in layout.items():
        questions = {}
        for image_id in image_ids:
            for k, (text, answer, structural) in enumerate(_questions(image_id)[:per_image]):
                questions[f"{split}{image_id}{k}"] = {
                    "imageId": image_id, "question": text, "answer": answer, "fullAnswer": f"It is {answer}.",
                    "types": {"structural": structural, "semantic": "attr", "detailed": "color"},
                    "isBalanced": True, "semantic": [], "annotations": {},
                }
        (root / f"{split}_balanced_questions.json").write_text(json.dumps(questions))
    submission = {"s1": {"imageId": "n21", "question": "What color is it?"}, "s2": {"imageId": "n21", "question": "?"}}
    (root / "submission_all_questions.json").write_text(json.dumps(submission))
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_gqa(tmp_path / "gqa")


def _task(data: Path, tmp_path: Path, **kwargs) -> GQATask:
    files = {"submission": "submission_all_questions.json"}
    return GQATask(data, cache_dir=tmp_path / "cache", split_files=files, **kwargs)


def _batch(task: GQATask, examples, answers: list[str]) -> tuple[torch.Tensor, dict]:
    logits = torch.full((len(examples), task.num_classes), -5.0)
    for row, answer in enumerate(answers):
        logits[row, task.answers.index(answer)] = 5.0
    labels = torch.tensor([e.label for e in examples])
    batch = {
        "question_ids": [e.question_id for e in examples],
        "answer_types": torch.tensor([task.answer_types.index(e.answer_type or "verify") for e in examples]),
        "labels": labels,
        "targets": labels,
    }
    return logits, batch


def test_examples_and_vocabulary(data, tmp_path):
    task = _task(data, tmp_path)
    train = task.examples("train")
    assert len(train) == 12 and len(task.examples("val")) == 6 and len(task.examples("testdev")) == 2
    # All training answers, most frequent first, ties alphabetical: no x5, blue/red x2 ...
    assert task.answers == ["no", "blue", "red", "green", "neither", "yes"]
    first = train[0]
    assert (first.question_id, first.image_key, first.answer_type) == ("trainn10", "gqa/n1", "query")
    assert first.image_path == data / "images" / "n1.jpg" and first.image_path.is_file()
    assert task.answers[first.label] == "red" and first.answers == ("red",)
    assert list((tmp_path / "cache" / "gqa").glob("answer_vocab_all_*.json"))
    assert _task(data, tmp_path, top_k=2).answers == ["no", "blue"]


def test_metric_predictions_and_majority(data, tmp_path):
    task = _task(data, tmp_path, top_k=3)  # "green", "neither", "yes" fall outside the vocabulary
    val = task.examples("val")  # n11 red: query red, verify yes, choose red; n12 blue: blue, no, blue
    assert [e.label for e in val] == [2, -1, 2, 1, 0, 1]
    logits, batch = _batch(task, val, ["red", "no", "blue", "blue", "no", "red"])
    metric = task.metric()
    task.update_metric(metric, logits, batch)
    out = metric.compute()
    # Right: red (query), blue (query), no (verify); an answer outside the vocabulary is always wrong.
    assert out[""].item() == pytest.approx(3 / 6)
    assert out["query"].item() == 1.0 and out["verify"].item() == pytest.approx(0.5) and out["choose"].item() == 0.0
    rows = task.prediction_rows(logits, batch)
    assert rows[0] == {"questionId": "valn110", "prediction": "red"} and len(rows) == 6
    assert task.majority_accuracy("val") == pytest.approx(1 / 6)  # always "no"
    assert task.loss(logits, batch).item() > 0


def test_a_file_without_answers_is_unlabelled(data, tmp_path):
    task = _task(data, tmp_path)
    examples = task.examples("submission")
    assert [e.question_id for e in examples] == ["s1", "s2"]
    assert all(e.label == -1 and e.answers == () and e.answer_type == "" for e in examples)
    logits, batch = _batch(task, examples, ["red", "no"])
    assert task.loss(logits, batch).item() == 0.0
    metric = task.metric()
    task.update_metric(metric, logits, batch)
    assert metric.total.sum() == 0
    assert task.prediction_rows(logits, batch) == [
        {"questionId": "s1", "prediction": "red"}, {"questionId": "s2", "prediction": "no"}
    ]
    assert task.majority_accuracy("submission") is None


def _edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["trainn11"].pop("answer"),
         r"train_balanced_questions\.json: question 'trainn11': missing key 'answer'"),
        (lambda d: d["trainn12"].pop("imageId"), r"question 'trainn12': missing key 'imageId'"),
        (lambda d: d["trainn20"]["types"].pop("structural"), r"question 'trainn20', 'types': missing key 'structural'"),
        (lambda d: d["trainn21"]["types"].update(structural="count"),
         r"question 'trainn21': types\.structural 'count' is not one of \[.*\] \(task\.answer_types\)"),
        (lambda d: d.update(trainn30=["not", "an", "object"]),
         r"question 'trainn30': expected a JSON object, got list"),
        (lambda d: [q.pop("answer") for q in d.values()], r"no question has an 'answer', but split 'train'"),
    ],
)
def test_malformed_questions_name_the_file_entry_and_key(data, tmp_path, edit, message):
    _edit(data / "train_balanced_questions.json", edit)
    with pytest.raises(DataFormatError, match=message):
        _task(data, tmp_path).examples("train")


def test_missing_and_broken_files_are_named(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"split 'nope' not found: .*nope_balanced_questions\.json"):
        _task(data, tmp_path).examples("nope")
    (data / "val_balanced_questions.json").write_text('{"q1": {"imageId": "n1",\n "question": }')
    with pytest.raises(DataFormatError, match=r"val_balanced_questions\.json .* not valid JSON: .* line 2 column"):
        _task(data, tmp_path).examples("val")
    (data / "val_balanced_questions.json").write_text("[]")
    with pytest.raises(DataFormatError, match=r"val_balanced_questions\.json: expected a JSON object"):
        _task(data, tmp_path).examples("val")


def test_a_missing_image_is_named_with_the_question_that_refers_to_it(data, tmp_path):
    image = data / "images" / "n21.jpg"
    image.unlink()
    question = r"submission_all_questions\.json: question 's1'"
    with pytest.raises(FileNotFoundError, match=rf"image file not found: {image} \(referred to by .*{question}\)"):
        _task(data, tmp_path).check_images("submission")


def test_experiment_config_builds_the_task(data, tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=gqa", f"task.root={data}", f"paths.cache_dir={tmp_path}"])
    assert list(cfg.encoder) == ["clip", "dino", "vit"] and cfg.monitor.metric == "val/acc"
    task = instantiate(cfg.task)
    assert (task.train_split, task.val_split, task.test_split) == ("train", "val", "testdev")
    assert len(task.examples("submission")) == 2  # split_files from the config


# ---- train.py and eval.py as a user runs them ------------------------------------------------------

TINY = ["encoder=[clip_tiny,dino_tiny]", "text=tiny", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
        "data.num_workers=0", "data.batch_size=4", "logger=csv"]


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FUSION_CACHE_DIR=str(cwd / "cache"), FUSION_DATA_DIR=str(cwd / "data"))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_train_then_eval_writes_the_submission_file(data, tmp_path):
    run = tmp_path / "train"
    common = ["+experiment=gqa", f"task.root={data}", *TINY]
    proc = _run("train.py", [*common, "trainer.max_epochs=1", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/acc_query", "test/acc", "val/majority_acc", "test/majority_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key

    evaluated = tmp_path / "eval"
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = _run("eval.py", [*common, f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={evaluated}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "val/acc" in json.loads((evaluated / "metrics.json").read_text())
    rows = json.loads((evaluated / "predictions.json").read_text())
    questions = json.loads((data / "val_balanced_questions.json").read_text())
    assert sorted(r["questionId"] for r in rows) == sorted(questions)
    vocab = GQATask(data, cache_dir=tmp_path / "cache").answers
    for row in rows:
        assert set(row) == {"questionId", "prediction"} and isinstance(row["questionId"], str)
        assert row["prediction"] in vocab

    # The unanswered submission questions: predictions for both, and no loss (nothing to compute it on).
    submission = tmp_path / "eval_submission"
    proc = _run("eval.py", [*common, f"ckpt_path={ckpt}", "split=submission", f"hydra.run.dir={submission}"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(r["questionId"] for r in json.loads((submission / "predictions.json").read_text())) == ["s1", "s2"]
    metrics = json.loads((submission / "metrics.json").read_text())
    assert not any(key.endswith("/loss") for key in metrics), metrics
