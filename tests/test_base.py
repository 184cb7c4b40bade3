"""The checks every task's examples pass (fusion.tasks.base): an empty split, a repeated id and an empty text are
refused the same way for every task, naming the file and the line or id; check_split names the split too."""

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fusion.tasks.base import FileTask, VLTask
from fusion.tasks.flickr30k import Flickr30kTask
from fusion.tasks.gqa import GQATask
from fusion.tasks.hateful_memes import HatefulMemesTask
from fusion.tasks.nlvr import NLVRTask
from fusion.tasks.nlvr2 import NLVR2Task
from fusion.tasks.shapes import ShapesTask
from fusion.tasks.snli_ve import SNLIVETask
from fusion.tasks.vqa import VQATask

DEFECTS = ("empty", "duplicate", "blank")


def _lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(defect: str, good: Callable[[int], dict], text_key: str) -> list[dict]:
    """Three rows 1, 2, 3 ("good"), or none ("empty"), or row 1 again as line 3 ("duplicate"), or row 2's text
    blank ("blank")."""
    if defect == "empty":
        return []
    rows = [good(1), good(2), good(3)]
    if defect == "duplicate":
        rows[2] = good(1)
    elif defect == "blank":
        rows[1][text_key] = "   "
    return rows


# Each maker writes a tiny dataset below root whose split "test" (or the task's name for it) has the defect, and
# returns the task, the split and what the refusal must say (a regex searched in the message).
def vqa(root: Path, defect: str) -> tuple[FileTask, str, str]:
    question = {"question_id": 1, "image_id": 1, "question": "is it red?"}
    annotation = {"question_id": 1, "image_id": 1, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no",
                  "multiple_choice_answer": "yes"}
    root.mkdir(parents=True)
    (root / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps({"questions": [question]}))
    (root / "v2_mscoco_train2014_annotations.json").write_text(json.dumps({"annotations": [annotation]}))
    # test2015 has no annotations file: an unlabelled split, its questions only.
    rows = _rows(defect, lambda i: {"question_id": i, "image_id": i, "question": f"is {i} red?"}, "question")
    path = root / "v2_OpenEnded_mscoco_test2015_questions.json"
    path.write_text(json.dumps({"questions": rows}))
    says = {
        "empty": rf"{re.escape(str(root))}\S*: split 'test2015' of task 'vqav2' has no examples",
        "duplicate": rf"{re.escape(str(path))}: question_id 1\b.*(duplicate|more than once)",
        "blank": rf"{re.escape(str(path))}: question_id 2: the text of '2' is empty",
    }.get(defect, "")
    return VQATask(root, test_split="test2015"), "test2015", says


def gqa(root: Path, defect: str) -> tuple[FileTask, str, str]:
    root.mkdir(parents=True)
    train = {"t1": {"imageId": "i1", "question": "is it red?", "answer": "yes", "types": {"structural": "verify"}}}
    (root / "train_balanced_questions.json").write_text(json.dumps(train))
    path = root / "testdev_balanced_questions.json"
    if defect == "duplicate":  # JSON text with a key twice: json.load would keep the second, dropping a question
        path.write_text('{\n"q1": {"imageId": "i1", "question": "is it red?"},\n'
                        '"q1": {"imageId": "i2", "question": "is it blue?"}\n}\n')
    else:
        rows = {f"q{i}": {"imageId": f"i{i}", "question": f"is {i} red?"} for i in (1, 2)} if defect != "empty" else {}
        if defect == "blank":
            rows["q2"]["question"] = ""
        path.write_text(json.dumps(rows))
    says = {
        "empty": rf"{re.escape(str(path))}: split 'testdev' of task 'gqa' has no examples",
        "duplicate": rf"{re.escape(str(path))} \(.*\): key 'q1' occurs twice in one JSON object \(lines 2 and 3\)",
        "blank": rf"{re.escape(str(path))}: question 'q2': the text of 'q2' is empty",
    }.get(defect, "")
    return GQATask(root), "testdev", says


def snli_ve(root: Path, defect: str) -> tuple[FileTask, str, str]:
    path = root / "snli_ve_test.jsonl"
    _lines(path, _rows(defect, lambda i: {"pairID": f"p{i}", "Flickr30K_ID": str(i), "sentence2": f"a dog {i}",
                                          "gold_label": "entailment"}, "sentence2"))
    return SNLIVETask(root), "test", _jsonl_says(path, defect, "p1", "sentence2")


def hateful_memes(root: Path, defect: str) -> tuple[FileTask, str, str]:
    path = root / "test_seen.jsonl"
    _lines(path, _rows(defect, lambda i: {"id": i, "img": f"img/{i}.png", "text": f"meme {i}", "label": 0}, "text"))
    return HatefulMemesTask(root), "test_seen", _jsonl_says(path, defect, "1", "text")


def nlvr(root: Path, defect: str) -> tuple[FileTask, str, str]:
    path = root / "test" / "test.json"
    _lines(path, _rows(defect, lambda i: {"identifier": f"{i}-0", "directory": "0", "sentence": f"there are {i}",
                                          "label": "true"}, "sentence"))
    return NLVRTask(root), "test", _jsonl_says(path, defect, "test-1-0-0", "sentence")


def nlvr2(root: Path, defect: str) -> tuple[FileTask, str, str]:
    path = root / "test1.json"
    _lines(path, _rows(defect, lambda i: {"identifier": f"test1-{i}-0-0", "sentence": f"two dogs {i}",
                                          "label": "True"}, "sentence"))
    images = root / "images"
    images.mkdir()
    for i in (1, 2, 3):
        for side in (0, 1):
            (images / f"test1-{i}-0-img{side}.png").write_bytes(b"")  # found by name; never decoded here
    return NLVR2Task(root), "test1", _jsonl_says(path, defect, "test1-1-0-0", "sentence")


def _jsonl_says(path: Path, defect: str, first_id: str, text_key: str) -> str:
    where = re.escape(str(path))
    return {
        "empty": rf"{where} holds no examples",
        "duplicate": rf"{where} lines 1, 3: id '{first_id}' occurs more than once in split",
        "blank": rf"{where} line 2: {text_key} is empty",
    }.get(defect, "")


def flickr30k(root: Path, defect: str) -> tuple[FileTask, str, str]:
    path = root / "dataset_flickr30k.json"
    images = [{"filename": "1.jpg", "split": "train", "sentences": [{"raw": "a dog"}]}]
    if defect != "empty":
        images += _rows(defect, lambda i: {"filename": f"{i + 1}.jpg", "split": "test",
                                           "sentences": [{"raw": f"cat {i}"}]}, "sentences")
        if defect == "blank":
            images[2]["sentences"] = [{"raw": " "}]
    root.mkdir(parents=True)
    path.write_text(json.dumps({"images": images}))
    where = re.escape(str(path))
    says = {
        "empty": rf"{where} has no image with split 'test'",
        "duplicate": rf"{where} images\[3\] \(2\.jpg\): image 'flickr30k/2' is listed twice \(also images\[1\]\)",
        "blank": rf"{where} images\[2\] \(3\.jpg\) sentences\[0\]: raw ' ' is not a non-empty string",
    }.get(defect, "")
    return Flickr30kTask(root), "test", says


def shapes(root: Path, defect: str) -> tuple[FileTask, str, str]:
    task = ShapesTask(root, num_train=2, num_val=1, num_test=0 if defect == "empty" else 2)
    task.prepare_data()
    path = task.questions_path("test")
    rows = json.loads(path.read_text())
    if defect == "duplicate":
        rows.append(rows[0])
    elif defect == "blank":
        rows[1]["question"] = ""
    path.write_text(json.dumps(rows))
    where = re.escape(str(path))
    first, second = (rows[0]["question_id"], rows[1]["question_id"]) if rows else ("", "")
    says = {
        "empty": rf"{where}: split 'test' of task 'shapes' has no examples",
        "duplicate": rf"{where}: question_id '{first}': id '{first}' occurs more than once in split 'test' "
                     rf"\(examples 0 and {len(rows) - 1} of the split\)",
        "blank": rf"{where}: question_id '{second}': the text of '{second}' is empty",
    }.get(defect, "")
    return task, "test", says


MAKERS = [vqa, gqa, snli_ve, hateful_memes, nlvr, nlvr2, flickr30k, shapes]


@pytest.mark.parametrize("defect", DEFECTS)
@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
def test_every_task_refuses_an_empty_split_a_repeated_id_and_an_empty_text(tmp_path, make, defect):
    task, split, says = make(tmp_path / "data", defect)
    with pytest.raises(ValueError, match=says):
        task.examples(split)
    # check_split (run before training and evaluation) says which split of which task it was reading.
    with pytest.raises(ValueError, match=says) as refused:
        task.check_split(split)
    assert f"split {split!r}" in str(refused.value)


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
def test_the_same_data_without_the_defect_is_read(tmp_path, make):
    """The makers' data is otherwise valid: each refusal above is for its defect, not for something else."""
    task, split, _ = make(tmp_path / "data", "good")
    examples = task.examples(split)
    assert examples and len({e.question_id for e in examples}) == len(examples)


def test_check_split_names_the_split_of_a_file_error(tmp_path):
    task = HatefulMemesTask(tmp_path)
    (tmp_path / "dev_seen.jsonl").write_text('{"id": 1, "img": "img/1.png", "text": "x", "label": 7}\n')
    path = re.escape(str(tmp_path / "dev_seen.jsonl"))
    with pytest.raises(ValueError, match=rf"^split 'dev_seen' of task 'hateful_memes': {path} line 1: label 7 is not "
                       r"one of 0, 1$"):
        task.check_split("dev_seen")


OPEN_ENDED = {"vqa", "gqa", "shapes"}


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
def test_generated_answers_are_scored_by_open_ended_tasks_and_refused_where_the_default_is_not_the_official_path(
    tmp_path, make
):
    """The default text scoring (exact match against the vocabulary, rows {"question_id", "answer"}) serves a task
    that keeps the default logits path; a task with its own metric or prediction format refuses it."""
    task, _, _ = make(tmp_path / "data", "good")
    assert task.open_ended == (make.__name__ in OPEN_ENDED)
    cls = type(task)

    def own(name: str) -> bool:
        return getattr(cls, name) is not getattr(VLTask, name)

    # Every open-ended task scores generated answers as its official metric and file do: by default or its own.
    refuses_metric = not own("update_metric_text") and (own("metric") or own("update_metric"))
    refuses_rows = not own("prediction_rows_text") and own("prediction_rows")
    assert not (task.open_ended and (refuses_metric or refuses_rows))
    if refuses_metric:
        with pytest.raises(NotImplementedError, match="but not update_metric_text"):
            task.update_metric_text(task.metric(), [], {})
    if refuses_rows:
        with pytest.raises(NotImplementedError, match="overrides prediction_rows but not prediction_rows_text"):
            task.prediction_rows_text([], {})
    expected = {"hateful_memes": (True, True), "nlvr": (True, True), "nlvr2": (True, True), "snli_ve": (False, True),
                "flickr30k": (True, False)}.get(make.__name__, (False, False))
    assert (refuses_metric, refuses_rows) == expected


def test_the_default_text_path_scores_a_closed_task_by_exact_match(tmp_path):
    task, split, _ = snli_ve(tmp_path / "data", "good")  # every pair "entailment"
    examples = task.examples(split)
    batch = {"question_ids": [e.question_id for e in examples], "labels": torch.tensor([e.label for e in examples]),
             "answer_types": torch.zeros(len(examples), dtype=torch.long)}
    metric = task.metric()
    task.update_metric_text(metric, ["entailment", "Entailment", "contradiction"], batch)
    assert float(metric.compute()[""]) == pytest.approx(1 / 3)
    with pytest.raises(NotImplementedError, match=r"'snli_ve' \(SNLIVETask\) overrides prediction_rows"):
        task.prediction_rows_text(["entailment"] * 3, batch)
