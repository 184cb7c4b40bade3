"""GQA: the loader on small data in the official format, metric, errors, train + eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
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


def _op(operation: str, argument: str) -> dict[str, str]:
    return {"operation": operation, "argument": argument}


# What the official release adds to every val question: a semantic program, types, groups, entailed questions.
PROGRAMS = {  # reasoning steps: 2, 1 ("query: name" is none), 2 ("exist" is none)
    "query": [_op("select", "image"), _op("query", "color")],
    "query name": [_op("select", "image"), _op("query", "name")],
    "verify": [_op("select", "image"), _op("verify color", "red")],
    "choose": [_op("select", "image"), _op("exist", "?"), _op("choose color", "red|blue")],
}
SEMANTIC = {"query": "attr", "verify": "obj", "choose": "rel"}
DETAILED = {"query": "color", "verify": "verifyAttr", "choose": "twoCommon"}  # "Common": the color/material rule
GROUPS = {"query": "color", "verify": None, "choose": "choice"}
ENTAILED = {
    "valn110": ["valn110", "valx1", "valn111"], "valn111": ["valx1"], "valn112": ["valn110"],
    "valn120": ["valx2", "valx3"], "valn121": ["valx3", "valx2"], "valn122": ["valx3"],
}
EXTRA = {  # in val_all_questions.json only: entailed ones (valx1-3) and one nothing entails (valx4)
    "valx1": ("n11", "Is the image blue?", "no"), "valx2": ("n12", "Is the image blue?", "yes"),
    "valx3": ("n12", "Is the image green?", "no"), "valx4": ("n11", "Is the image dark?", "no"),
}


def write_official_files(root: Path) -> None:
    """The val split as GQA's release has it: balanced questions with programs, groups and entailed questions,
    ``val_all_questions.json`` (those and the unbalanced EXTRA ones), ``val_choices.json``."""
    path = root / "val_balanced_questions.json"
    balanced = json.loads(path.read_text())
    for qid, q in balanced.items():
        kind = q["types"]["structural"]
        program = "query name" if qid == "valn120" else kind
        q.update(semantic=PROGRAMS[program], groups={"global": GROUPS[kind], "local": None}, entailed=ENTAILED[qid],
                 types={"structural": kind, "semantic": SEMANTIC[kind], "detailed": DETAILED[kind]})
    path.write_text(json.dumps(balanced))
    extra = {
        qid: {"imageId": image, "question": text, "answer": answer, "isBalanced": False, "entailed": [],
              "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
              "semantic": PROGRAMS["verify"], "groups": {"global": None, "local": None}}
        for qid, (image, text, answer) in EXTRA.items()
    }
    (root / "val_all_questions.json").write_text(json.dumps({**balanced, **extra}))
    colors, yes_no = ["red", "blue", "green"], ["yes", "no"]
    choices = {
        qid: {"valid": colors if q["types"]["structural"] != "verify" else yes_no,
              "plausible": ["red", "blue"] if q["types"]["structural"] == "query" else yes_no}
        for qid, q in balanced.items()
    }
    (root / "val_choices.json").write_text(json.dumps(choices))


def official_eval(questions: dict, choices: dict, rows: list[dict]) -> dict:
    """GQA's eval.py --consistency numbers (percentages; the distribution as printed) recomputed by hand from the
    all-questions, choices and prediction files, following its rules; None where its list would be empty."""
    pred = {r["questionId"]: r["prediction"] for r in rows}
    balanced = {q: v for q, v in questions.items() if v["isBalanced"]}
    right = {q: pred[q] == v["answer"] for q, v in balanced.items()}

    def pct(flags: list) -> float | None:
        return 100 * sum(flags) / len(flags) if flags else None

    def per(key) -> dict:
        groups = defaultdict(list)
        for q, v in balanced.items():
            groups[key(v)].append(right[q])
        return {k: pct(f) for k, f in groups.items()}

    def steps(v: dict) -> int:
        names = [f"{o['operation']}: {o['argument']}" for o in v["semantic"]]
        return sum(not any(w in n for w in ("exist", "query: name", "choose name")) for n in names)

    def belongs(answer: str, allowed: list, v: dict) -> bool:
        return answer in (["color", "material", "shape"] if "Common" in v["types"]["detailed"] else allowed)

    consistency = []
    for q, v in balanced.items():
        others = [e for e in v["entailed"] if e != q]
        if right[q] and others:
            consistency.append(sum(pred[e] == questions[e]["answer"] for e in others) / len(others))
    gold, seen = defaultdict(Counter), defaultdict(Counter)
    for q, v in balanced.items():
        if v["groups"]["global"] is not None:
            gold[v["groups"]["global"]][v["answer"]] += 1
            seen[v["groups"]["global"]][pred[q]] += 1
    chi = sum(sum((seen[g][a] - n) ** 2 / n for a, n in c.items()) * sum(c.values()) for g, c in gold.items())
    return {
        "accuracy": pct(list(right.values())),
        "binary": pct([right[q] for q, v in balanced.items() if v["types"]["structural"] != "query"]),
        "open": pct([right[q] for q, v in balanced.items() if v["types"]["structural"] == "query"]),
        "validity": pct([belongs(pred[q], choices[q]["valid"], v) for q, v in balanced.items()]),
        "plausibility": pct([belongs(pred[q], choices[q]["plausible"], v) for q, v in balanced.items()]),
        "consistency": 100 * sum(consistency) / len(consistency) if consistency else None,
        "distribution": chi / sum(sum(c.values()) for c in gold.values()) / 100,
        "structural": per(lambda v: v["types"]["structural"]),
        "semantic": per(lambda v: v["types"]["semantic"]),
        "steps": per(steps),
        "words": per(lambda v: len(v["question"].split())),
    }


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


def _scores(metric) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


def test_generated_answers_score_as_the_index_path_and_outside_the_vocabulary(data, tmp_path):
    task = _task(data, tmp_path, top_k=3)  # vocabulary: no, blue, red
    assert task.open_ended
    val = task.examples("val")  # n11 red: query red, verify yes, choose red; n12 blue: blue, no, blue
    answers = ["red", "no", "blue", "blue", "no", "red"]
    logits, batch = _batch(task, val, answers)
    from_logits, from_text = task.metric(), task.metric()
    task.update_metric(from_logits, logits, batch)
    task.update_metric_text(from_text, answers, batch)
    assert from_text.predictions() == from_logits.predictions()
    assert _scores(from_text) == _scores(from_logits)
    assert task.prediction_rows_text(answers, batch) == task.prediction_rows(logits, batch)
    # "yes" is outside the vocabulary but is valn111's answer: right. "Red" and "neither" are wrong (exact strings).
    texts = ["red", "yes", "Red", "blue", "no", "neither"]
    metric = task.metric()
    task.update_metric_text(metric, texts, batch)
    out = _scores(metric)
    assert out[""] == pytest.approx(4 / 6)
    assert (out["query"], out["verify"], out["choose"]) == (1.0, 1.0, 0.0)
    assert task.prediction_rows_text(texts, batch) == [
        {"questionId": e.question_id, "prediction": t} for e, t in zip(val, texts, strict=True)
    ]


def test_generated_answers_get_every_official_measure(data, tmp_path):
    write_official_files(data)
    task = _task(data, tmp_path)
    val = task.examples("val")
    texts = {"valn110": "red", "valn111": "yes", "valn112": "purple", "valn120": "blue", "valn121": "no",
             "valn122": "Blue", "valx1": "no", "valx2": "maybe", "valx3": "no"}
    assert [e.question_id for e in val] == list(texts)
    batch = {"question_ids": list(texts)}
    metric = task.metric()
    task.update_metric_text(metric, list(texts.values()), batch)
    out = _scores(metric)
    # Right: valn110, valn111, valn120, valn121; "purple" and "Blue" (choose, answers red and blue) wrong.
    assert out[""] == pytest.approx(4 / 6)
    # Valid / plausible: the same four; the choose questions are "twoCommon": only color/material/shape count.
    assert out["validity"] == pytest.approx(4 / 6) and out["plausibility"] == pytest.approx(4 / 6)
    # Consistency: valn110 (valx1 "no", valn111 "yes": both right) 1, valn111 (valx1) 1, valn120 (valx2 "maybe"
    # wrong, valx3 right) 0.5, valn121 0.5 -> 0.75.
    assert out["consistency"] == pytest.approx(0.75)
    # Distribution: group color gold {red, blue} = predicted: 0; group choice gold {red: 1, blue: 1}, predicted
    # {purple: 1, Blue: 1}: 1 + 1 = 2 over 2 questions. (0 * 2 + 2 * 2) / 4 / 100.
    assert out["distribution"] == pytest.approx(0.01)
    rows = task.prediction_rows_text(list(texts.values()), batch)
    all_questions = json.loads((data / "val_all_questions.json").read_text())
    official = official_eval(all_questions, json.loads((data / "val_choices.json").read_text()), rows)
    assert out[""] == pytest.approx(official["accuracy"] / 100)
    for name in ("consistency", "validity", "plausibility"):
        assert out[name] == pytest.approx(official[name] / 100)
    assert out["distribution"] == pytest.approx(official["distribution"])


def test_a_file_without_answers_is_unlabelled(data, tmp_path):
    task = _task(data, tmp_path)
    examples = task.examples("submission")
    assert [e.question_id for e in examples] == ["s1", "s2"]
    assert all(e.label == -1 and e.answers == () and e.answer_type == "" for e in examples)
    logits, batch = _batch(task, examples, ["red", "no"])
    assert task.loss(logits, batch).item() == 0.0
    metric = task.metric()
    task.update_metric(metric, logits, batch)
    assert metric.predictions() == {}
    assert task.prediction_rows(logits, batch) == [
        {"questionId": "s1", "prediction": "red"}, {"questionId": "s2", "prediction": "no"}
    ]
    task.update_metric_text(metric, ["crimson", ""], batch)
    assert metric.predictions() == {}
    assert task.prediction_rows_text(["crimson", ""], batch) == [
        {"questionId": "s1", "prediction": "crimson"}, {"questionId": "s2", "prediction": ""}
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
    write_official_files(data)  # val: every official measure; testdev: those its balanced file allows
    run = tmp_path / "train"
    common = ["+experiment=gqa", f"task.root={data}", *TINY]
    proc = _run("train.py", [*common, "trainer.max_epochs=1", f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/acc_query", "val/acc_validity", "test/acc", "test/acc_binary", "val/majority_acc",
                "test/majority_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key

    evaluated = tmp_path / "eval"
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = _run("eval.py", [*common, f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={evaluated}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((evaluated / "predictions.json").read_text())
    questions = json.loads((data / "val_balanced_questions.json").read_text())
    # The balanced questions and the entailed ones consistency needs (valx4 is entailed by none).
    assert sorted(r["questionId"] for r in rows) == sorted([*questions, "valx1", "valx2", "valx3"])
    vocab = GQATask(data, cache_dir=tmp_path / "cache").answers
    for row in rows:
        assert set(row) == {"questionId", "prediction"} and isinstance(row["questionId"], str)
        assert row["prediction"] in vocab

    # Every number equals the official script's on the prediction file (its percentages / 100).
    metrics = json.loads((evaluated / "metrics.json").read_text())
    all_questions = json.loads((data / "val_all_questions.json").read_text())
    official = official_eval(all_questions, json.loads((data / "val_choices.json").read_text()), rows)
    expected = {"val/acc": official["accuracy"] / 100, "val/acc_distribution": official["distribution"]}
    for name in ("binary", "open", "consistency", "validity", "plausibility"):
        if official[name] is not None:  # an empty list prints 0.00; the project leaves the measure out
            expected[f"val/acc_{name}"] = official[name] / 100
    for family, prefix in (("structural", ""), ("semantic", "semantic_"), ("steps", "steps_"), ("words", "words_")):
        expected.update({f"val/acc_{prefix}{k}": v / 100 for k, v in official[family].items()})
    assert set(official["steps"]) == {1, 2} and set(official["words"]) == {4, 5, 6}
    scores = {k: v for k, v in metrics.items() if k.startswith("val/acc")}
    assert scores == pytest.approx(expected, abs=1e-6)
    log_text = (evaluated / "eval.log").read_text()
    assert "split val: GQA grounding not computed (it needs the model's attention maps)" in log_text
    assert "split val: 3 entailed questions from" in log_text

    # The unanswered submission questions: predictions for both, and no loss (nothing to compute it on).
    submission = tmp_path / "eval_submission"
    proc = _run("eval.py", [*common, f"ckpt_path={ckpt}", "split=submission", f"hydra.run.dir={submission}"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(r["questionId"] for r in json.loads((submission / "predictions.json").read_text())) == ["s1", "s2"]
    metrics = json.loads((submission / "metrics.json").read_text())
    assert not any(key.endswith("/loss") for key in metrics), metrics
