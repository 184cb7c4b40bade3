"""VQAv2 / OK-VQA: the loader on small data in the official format, targets, metric, errors, train + eval."""

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
from fusion.tasks.vqa import VQATask

ROOT = Path(__file__).resolve().parents[1]
VQAV2 = {
    "questions_file": "v2_OpenEnded_mscoco_{split}_questions.json",
    "annotations_file": "v2_mscoco_{split}_annotations.json",
}
OKVQA = {
    "questions_file": "OpenEnded_mscoco_{split}_questions.json",
    "annotations_file": "mscoco_{split}_annotations.json",
}
COLORS = {1: "red", 2: "blue", 3: "green", 11: "red", 12: "blue", 21: "green"}


def _annotation(qid: int, image_id: int, answers: list[str], answer_type: str) -> dict:
    return {
        "question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": answer_type,
        "multiple_choice_answer": max(set(answers), key=answers.count),
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
    }


def _questions(image_id: int, count: int) -> list[tuple[str, list[str], str]]:
    """Up to 4 (question, ten answers, answer type) about a flat-coloured image."""
    color = COLORS[image_id]
    return [
        ("what color is the image?", [color] * 7 + [f"dark {color}"] * 2 + ["a " + color], "other"),
        ("is the image red?", ["yes" if color == "red" else "no"] * 9 + ["maybe"], "yes/no"),
        ("how many colors are there?", ["1"] * 6 + ["one"] * 2 + ["2"] * 2, "number"),
        ("is it dark?", ["no"] * 8 + ["yes"] * 2, "yes/no"),
    ][:count]


def write_vqa(root: Path, files: dict = VQAV2, unlabelled: str | None = "test-dev2015", okvqa: bool = False) -> Path:
    """12 train questions on 3 images, 6 val questions on 2, and an unannotated split on a third folder.

    ``okvqa``: every answer type is "other", as in OK-VQA.
    """
    layout = {"train2014": ([1, 2, 3], 4), "val2014": ([11, 12], 3)}
    for split, (image_ids, per_image) in layout.items():
        questions, annotations = [], []
        (root / split).mkdir(parents=True, exist_ok=True)
        for image_id in image_ids:
            rgb = {"red": (220, 0, 0), "blue": (0, 0, 220), "green": (0, 200, 0)}[COLORS[image_id]]
            Image.new("RGB", (40, 40), rgb).save(root / split / f"COCO_{split}_{image_id:012d}.jpg")
            for k, (text, answers, answer_type) in enumerate(_questions(image_id, per_image)):
                qid = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": text, "question_id": qid})
                annotations.append(_annotation(qid, image_id, answers, "other" if okvqa else answer_type))
        (root / files["questions_file"].format(split=split)).write_text(json.dumps({"questions": questions}))
        (root / files["annotations_file"].format(split=split)).write_text(json.dumps({"annotations": annotations}))
    if unlabelled:
        (root / "test2015").mkdir(exist_ok=True)
        Image.new("RGB", (40, 40)).save(root / "test2015" / f"COCO_test2015_{21:012d}.jpg")
        questions = [{"image_id": 21, "question": "what color is the image?", "question_id": 21000}]
        (root / files["questions_file"].format(split=unlabelled)).write_text(json.dumps({"questions": questions}))
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_vqa(tmp_path / "vqa")


def _task(data: Path, tmp_path: Path, **kwargs) -> VQATask:
    return VQATask(data, cache_dir=tmp_path / "cache", image_splits={"test-dev2015": "test2015"}, **kwargs)


def _batch(task: VQATask, examples, answers: list[str]) -> tuple[torch.Tensor, dict]:
    """Logits that pick ``answers`` and the batch keys the task reads."""
    logits = torch.full((len(examples), task.num_classes), -5.0)
    for row, answer in enumerate(answers):
        logits[row, task.answers.index(answer)] = 5.0
    batch = {
        "question_ids": [e.question_id for e in examples],
        "answer_types": torch.tensor([task.answer_types.index(e.answer_type or "yes/no") for e in examples]),
        "labels": torch.tensor([e.label for e in examples]),
        "targets": torch.stack([task.target(e) for e in examples]),
    }
    return logits, batch


def test_examples_vocabulary_and_soft_targets(data, tmp_path):
    task = _task(data, tmp_path)
    train = task.examples("train2014")
    assert len(train) == 12 and len(task.examples("val2014")) == 6
    # Every annotator's normalised answer counts: "one" joins "1", "a red" joins "red".
    assert task.answers[:2] == ["no", "1"]
    assert "one" not in task.answers and "a red" not in task.answers and "dark red" in task.answers
    first = train[0]
    assert first.question_id == "1000" and first.image_key == "coco/train2014/1"
    assert first.image_path == data / "train2014" / "COCO_train2014_000000000001.jpg" and first.image_path.is_file()
    assert first.answer_type == "other" and task.answers[first.label] == "red" and len(first.answers) == 10
    target = task.target(first)
    assert target.shape == (task.num_classes,)
    # 8 of 10 say "red" after normalisation, 2 "dark red": leave-one-out accuracies 1.0 and 0.6.
    assert target[task.answers.index("red")] == pytest.approx(1.0)
    assert target[task.answers.index("dark red")] == pytest.approx(0.6)
    assert target.sum() == pytest.approx(1.6)
    counts = train[2]  # "how many colors": 8x "1" (6 + two "one"), 2x "2"
    assert task.answers[counts.label] == "1" and counts.answer_type == "number"


def test_top_k_and_the_cached_vocabulary(data, tmp_path, monkeypatch):
    task = _task(data, tmp_path, top_k=3)
    assert task.answers == ["no", "1", "yes"]
    cached = list((tmp_path / "cache" / "vqav2").glob("answer_vocab_3_*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["answers"] == ["no", "1", "yes"]
    # An answer outside the vocabulary: label -1, and the target has no entry for it.
    color = task.examples("train2014")[0]
    assert color.label == -1 and task.target(color).sum() == 0
    # A second task reads the cache instead of counting the training answers again.
    monkeypatch.setattr(VQATask, "_count_training_answers", lambda self: pytest.fail("vocabulary rebuilt"))
    assert _task(data, tmp_path, top_k=3).answers == ["no", "1", "yes"]
    monkeypatch.undo()
    # A pinned vocabulary file is used as it is.
    pinned = tmp_path / "vocab.json"
    pinned.write_text(json.dumps({"answers": ["red", "no"], "counts": [1, 1]}))
    assert _task(data, tmp_path, vocab_file=pinned).answers == ["red", "no"]


def test_an_unwritable_cache_only_costs_a_rebuild(data, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    task = VQATask(data, cache_dir=blocker, top_k=3)  # cannot make folders below a file
    assert task.answers == ["no", "1", "yes"]
    assert "could not cache the answer vocabulary" in caplog.text


def test_metric_predictions_and_majority(data, tmp_path):
    task = _task(data, tmp_path)
    examples = task.examples("val2014")[:3]  # image 11 (red): color, "is it red?", "how many colors?"
    logits, batch = _batch(task, examples, ["red", "no", "2"])
    metric = task.metric()
    task.update_metric(metric, logits, batch)
    out = metric.compute()
    # red: 7 + "a red" = 8 of 10 -> 1.0; "no" for "is it red?" (9 yes, 1 maybe) -> 0; "2": 2 of 10 -> 0.6.
    assert out[""].item() == pytest.approx(1.6 / 3)
    assert out["other"].item() == pytest.approx(1.0)
    assert out["yes_no"].item() == 0.0 and out["number"].item() == pytest.approx(0.6)
    rows = task.prediction_rows(logits, batch)
    assert rows == [{"question_id": 11000, "answer": "red"}, {"question_id": 11001, "answer": "no"},
                    {"question_id": 11002, "answer": "2"}]
    # Always "no" (the most frequent training answer): only "is the image red?" about the blue image (9 "no")
    # scores, 1.0; the other five validation questions score 0.
    assert task.majority_accuracy("val2014") == pytest.approx(1 / 6)


def _scores(metric) -> dict[str, float]:
    return {k: v.item() for k, v in metric.compute().items()}


def test_generated_vocabulary_answers_score_and_write_as_the_logits_path(data, tmp_path):
    task = _task(data, tmp_path)
    assert task.open_ended
    examples = task.examples("val2014")
    answers = ["red", "no", "2", "blue", "yes", "1"]
    logits, batch = _batch(task, examples, answers)
    from_logits, from_text = task.metric(), task.metric()
    task.update_metric(from_logits, logits, batch)
    task.update_metric_text(from_text, answers, batch)
    # red 1.0, no 0, "2" 0.6 (image 11); blue 1.0, yes 0 (9 "no"), "1" 1.0 (image 12): 3.6 / 6.
    assert _scores(from_text) == _scores(from_logits) == pytest.approx(
        {"": 3.6 / 6, "other": 1.0, "yes_no": 0.0, "number": 0.8}
    )
    assert task.prediction_rows_text(answers, batch) == task.prediction_rows(logits, batch)
    with pytest.raises(ValueError, match="5 predicted answers for a batch of 6"):
        task.update_metric_text(task.metric(), answers[:5], batch)


def test_a_generated_answer_outside_the_vocabulary_is_scored_by_the_official_accuracy(tmp_path):
    root = tmp_path / "vqa"
    (root / "train2014").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train2014" / "COCO_train2014_000000000001.jpg")
    _write_split(root, "train2014", [("what color?", ["blue"] * 10, "other")], image_id=1)
    (root / "val2014").mkdir()
    _write_split(root, "val2014", [
        ("what color?", ["light blue"] * 3 + ["blue"] * 5 + ["navy"] * 2, "other"),  # mixed: predictions processed
        ("what color?", ["Light Blue"] * 10, "other"),  # unanimous: predictions only cleaned
    ], image_id=1)
    task = VQATask(root, cache_dir=tmp_path / "cache", image_splits={"val2014": "train2014"})
    assert task.answers == ["blue"]
    examples = task.examples("val2014")
    _, batch = _batch(task, examples, ["blue", "blue"])
    metric = task.metric()
    # "Light-Blue." -> "-" becomes a space, the period goes, lower case: "light blue", 3 of 10 annotators;
    # leave-one-out: (3 x 2/3 + 7 x 1) / 10 = 0.9. Against ten "Light Blue" only newline/tab/strip apply:
    # "light blue" != "Light Blue" -> 0.
    texts = ["Light-Blue.", "light blue"]
    task.update_metric_text(metric, texts, batch)
    assert _scores(metric) == pytest.approx({"": 0.45, "other": 0.45})
    # The rows hold the raw strings: the evaluator processes them itself.
    assert task.prediction_rows_text(texts, batch) == [
        {"question_id": 900000, "answer": "Light-Blue."}, {"question_id": 900001, "answer": "light blue"}
    ]
    # "blue" (5 of 10 -> 1.0) as text and as logits alike; " Light Blue\n" cleaned to "Light Blue" -> 1.0.
    logits, first = _batch(task, examples[:1], ["blue"])
    from_logits, from_text = task.metric(), task.metric()
    task.update_metric(from_logits, logits, first)
    task.update_metric_text(from_text, ["blue"], first)
    assert _scores(from_text) == _scores(from_logits) == {"": 1.0, "other": 1.0}
    metric = task.metric()
    task.update_metric_text(metric, ["blue", " Light Blue\n"], batch)
    assert _scores(metric) == {"": 1.0, "other": 1.0}


def test_generated_answers_on_an_unlabelled_split_are_written_not_scored(data, tmp_path):
    task = _task(data, tmp_path)
    (example,) = task.examples("test-dev2015")
    _, batch = _batch(task, [example], ["red"])
    metric = task.metric()
    task.update_metric_text(metric, ["Crimson!"], batch)
    assert metric.count.sum() == 0
    assert task.prediction_rows_text(["Crimson!"], batch) == [{"question_id": 21000, "answer": "Crimson!"}]


def _write_split(root: Path, split: str, rows: list[tuple[str, list, str]], image_id: int) -> None:
    """One VQAv2-format split: (question, answers, answer type) about one image; answers are strings (each
    with its own answer_id, as in the official files) or ready answer dicts."""
    questions, annotations = [], []
    for k, (text, answers, answer_type) in enumerate(rows):
        qid = 900000 + k
        questions.append({"image_id": image_id, "question": text, "question_id": qid})
        entries = [
            a if isinstance(a, dict) else {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
            for i, a in enumerate(answers)
        ]
        annotations.append({
            "question_id": qid, "image_id": image_id, "question_type": "what", "answer_type": answer_type,
            "multiple_choice_answer": entries[0]["answer"], "answers": entries,
        })
    (root / VQAV2["questions_file"].format(split=split)).write_text(json.dumps({"questions": questions}))
    (root / VQAV2["annotations_file"].format(split=split)).write_text(json.dumps({"annotations": annotations}))


def test_vocabulary_targets_and_labels_use_the_evaluators_form_of_the_answers(tmp_path):
    # Training answers that the official evaluator compares in different forms (module docstring of
    # fusion.metrics.vqa): processed where annotators disagree, left as they are where all ten agree.
    root = tmp_path / "vqa"
    (root / "train2014").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train2014" / "COCO_train2014_000000000001.jpg")
    _write_split(root, "train2014", [
        ("how many?", ["Two"] * 10, "number"),  # all identical: the evaluator rewards exactly "Two"
        ("how many?", ["two"] * 4 + ["2"] * 2 + ["3\n"] * 4, "number"),  # mixed: "2" x6, "3" x4
        ("what?", ["The Dog."] * 3 + ["dog"] * 7, "other"),  # mixed: "dog" x10
    ], image_id=1)
    (root / "val2014").mkdir()
    _write_split(root, "val2014", [("how many?", ["2"] * 10, "number")], image_id=1)
    task = VQATask(root, cache_dir=tmp_path / "cache", image_splits={"val2014": "train2014"})
    # Counted in the evaluator's form: "dog" 10, "Two" 10, "2" 6, "3" 4 (ties alphabetical: "Two" < "dog").
    assert task.answers == ["Two", "dog", "2", "3"]
    same, mixed, dog = task.examples("train2014")
    # Each entry's target is the accuracy the evaluator gives it as the prediction:
    # ten "Two": "Two" -> 1; "2" is not processed against unanimous answers -> 0.
    assert task.target(same).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    # Mixed: "Two" -> "2" (6 matches -> 1.0) like "2" itself; "3": 4 matches -> 1.0.
    assert task.target(mixed).tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0])
    assert task.target(dog).tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    # The label is the multiple-choice answer in the evaluator's form ("two" -> "2" where mixed).
    assert [task.answers[e.label] for e in (same, mixed, dog)] == ["Two", "2", "dog"]
    # Majority baseline on val: always "Two" (10 votes, first of the tie alphabetically) against ten "2":
    # nothing is processed, "Two" != "2" -> 0.
    assert task.majority_accuracy("val2014") == 0.0


def test_question_prior_is_scored_by_the_official_accuracy(data, tmp_path):
    from fusion.analysis.common import question_prior_accuracy

    task = _task(data, tmp_path)
    # Training guesses per question: colour -> "red" (one each, first seen), "is it red?" -> "no" (2 of 3),
    # "how many?" -> "1". On val (red image 11, blue image 12): colour 1.0 / 0 (8 "red" of 10 / none),
    # "is it red?" 0 (9 yes, 1 maybe) / 1.0 (9 no), "how many?" 1.0 twice ("one" -> "1": 8 of 10).
    assert question_prior_accuracy(task, "val2014") == pytest.approx(4 / 6)
    first = task.examples("val2014")[0]
    assert task.answer_accuracy(first, task.answers.index("dark red")) == pytest.approx(0.6)


def test_loss_is_bce_summed_over_answers(data, tmp_path):
    task = _task(data, tmp_path)
    examples = task.examples("train2014")[:4]
    logits, batch = _batch(task, examples, ["red", "yes", "1", "no"])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["targets"]) * task.num_classes
    assert task.loss(logits, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_split_without_annotations_is_unlabelled(data, tmp_path, caplog):
    task = _task(data, tmp_path)
    (example,) = task.examples("test-dev2015")
    assert "not found" in caplog.text and "unlabelled" in caplog.text
    assert example.label == -1 and example.answers == () and example.image_key == "coco/test2015/21"
    assert example.image_path.is_file()
    logits, batch = _batch(task, [example], ["red"])
    assert (batch["targets"] == -1).all()
    assert task.loss(logits, batch).item() == 0.0
    metric = task.metric()
    task.update_metric(metric, logits, batch)
    assert metric.count.sum() == 0
    assert task.prediction_rows(logits, batch) == [{"question_id": 21000, "answer": "red"}]
    assert task.majority_accuracy("test-dev2015") is None
    assert not task.is_labelled("test-dev2015") and task.is_labelled("val2014")  # eval.py: predictions only


def _edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("v2_OpenEnded_mscoco_train2014_questions.json", lambda d: d["questions"][1].pop("question"),
         r"train2014_questions\.json: question_id 1001: missing key 'question'"),
        ("v2_OpenEnded_mscoco_train2014_questions.json", lambda d: d["questions"][0].update(image_id="1"),
         r"question_id 1000: key 'image_id' is '1', expected an integer"),
        ("v2_OpenEnded_mscoco_train2014_questions.json", lambda d: d.pop("questions"),
         r"train2014_questions\.json: missing key 'questions'"),
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"].pop(2),
         r"train2014_annotations\.json: no annotation for question_id 1002"),
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"][3]["answers"][4].pop("answer"),
         r"annotation of question_id 1003, answers\[4\]: missing key 'answer'"),
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"][0].pop("multiple_choice_answer"),
         r"annotation of question_id 1000: missing key 'multiple_choice_answer'"),
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"][0].update(answer_type="colour"),
         r"question_id 1000: answer_type 'colour' is not one of \['yes/no', 'number', 'other'\]"),
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"][0].update(image_id=7),
         r"annotation of question_id 1000 has image_id 7, the question in .* has 1"),
        # A question annotated twice: json keeps both entries, and the second must not silently win.
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"].append(dict(d["annotations"][1])),
         r"train2014_annotations\.json: annotation of question_id 1001: question_id annotated twice "
         r"\(annotations\[12\] repeats it\)"),
        ("v2_mscoco_train2014_annotations.json", lambda d: d["annotations"].clear(),
         r"train2014_annotations\.json: no annotation for question_id 1000"),
    ],
)
def test_malformed_files_name_the_file_entry_and_key(data, tmp_path, file, edit, message):
    _edit(data / file, edit)
    with pytest.raises(DataFormatError, match=message):
        _task(data, tmp_path).examples("train2014")


def test_missing_and_broken_files_are_named(data, tmp_path):
    (data / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"annotations file not found: .*v2_mscoco_val2014_annotations\.json"):
        _task(data, tmp_path).examples("val2014")  # the validation split needs its answers
    with pytest.raises(FileNotFoundError, match=r"questions file for split 'nope' not found: .*_nope_questions\.json"):
        _task(data, tmp_path).examples("nope")
    path = data / "v2_mscoco_train2014_annotations.json"
    path.write_text('{"annotations": [\n{"question_id": 1,}\n]}')
    with pytest.raises(DataFormatError, match=r"train2014_annotations\.json .* not valid JSON: .* at line 2 column"):
        _task(data, tmp_path).examples("train2014")
    with pytest.raises(ValueError, match=r"image_file='\{image\}\.jpg' is not a valid pattern"):
        VQATask(data, image_file="{image}.jpg")
    with pytest.raises(FileNotFoundError, match=r"task.root=.*nothere is not a directory"):
        VQATask(tmp_path / "nothere").prepare_data()


def test_missing_images_are_named_with_the_question_that_refers_to_them(data, tmp_path):
    image = data / "val2014" / "COCO_val2014_000000000012.jpg"
    image.unlink()
    question = r"v2_OpenEnded_mscoco_val2014_questions\.json: question_id 12000"
    with pytest.raises(FileNotFoundError, match=rf"image file not found: {image} \(referred to by .*{question}\)$"):
        _task(data, tmp_path).check_images("val2014")
    (data / "val2014" / "COCO_val2014_000000000011.jpg").unlink()
    # Only the first is traced to its question; the others are counted and listed.
    more = r"question_id 11000\); 1 more image file\(s\) of split 'val2014' missing: .*0012\.jpg$"
    with pytest.raises(FileNotFoundError, match=more):
        _task(data, tmp_path).check_images("val2014")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_okvqa_is_the_vqa_loader_with_its_file_names(tmp_path):
    data = write_vqa(tmp_path / "okvqa", OKVQA, unlabelled=None, okvqa=True)
    cfg = _compose(["+experiment=okvqa", f"task.root={data}", f"paths.cache_dir={tmp_path / 'cache'}"])
    assert list(cfg.encoder) == ["clip", "dino", "vit"] and cfg.monitor.metric == "val/acc"
    task = instantiate(cfg.task)
    assert (task.name, task.train_split, task.val_split) == ("okvqa", "train2014", "val2014")
    assert task.test_split == "val2014"
    assert task.answer_types == ["other"] and task.top_k == 2000
    assert task.open_ended  # the LM head generates OK-VQA's answers, scored by the official VQA accuracy
    val = task.examples("val2014")
    assert len(val) == 6 and val[0].image_key == "coco/val2014/11" and val[0].image_path.is_file()
    assert {e.answer_type for e in val} == {"other"}
    assert len(list((tmp_path / "cache").glob("okvqa/answer_vocab_2000_*.json"))) == 1


def test_vqav2_root_defaults_below_the_data_dir_and_a_missing_folder_is_named(tmp_path):
    cfg = _compose(["+experiment=vqav2", f"paths.data_dir={tmp_path}"])
    assert cfg.task.top_k == 3129 and cfg.text.name_or_path == "bert-base-uncased"
    assert cfg.task.root == f"{tmp_path}/vqav2"
    with pytest.raises(FileNotFoundError, match=rf"task.root={tmp_path}/vqav2 is not a directory"):
        instantiate(cfg.task).prepare_data()


# ---- train.py and eval.py as a user runs them ------------------------------------------------------

TINY = ["encoder=[clip_tiny,dino_tiny]", "text=tiny", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
        "data.num_workers=0", "data.batch_size=4", "logger=csv"]


def _run(script: str, args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FUSION_CACHE_DIR=str(cache), FUSION_DATA_DIR=str(cwd / "data"))
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_train_then_eval_writes_the_official_results_file(data, tmp_path):
    run = tmp_path / "train"
    common = ["+experiment=vqav2", f"task.root={data}", *TINY]
    proc = _run("train.py", [*common, "trainer.max_epochs=1", f"hydra.run.dir={run}"], tmp_path, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/acc", "val/acc_yes_no", "val/acc_number", "val/acc_other", "test/acc", "val/majority_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert list((tmp_path / "cache" / "vqav2").glob("answer_vocab_3129_*.json"))

    evaluated = tmp_path / "eval"
    ckpt = run / "checkpoints" / "last.ckpt"
    proc = _run(
        "eval.py", [*common, f"ckpt_path={ckpt}", "split=val2014", f"hydra.run.dir={evaluated}"], tmp_path,
        tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "val2014/acc" in json.loads((evaluated / "metrics.json").read_text())
    rows = json.loads((evaluated / "predictions.json").read_text())
    questions = json.loads((data / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    question_ids = [q["question_id"] for q in questions]
    assert sorted(r["question_id"] for r in rows) == sorted(question_ids)
    vocab = VQATask(data, cache_dir=tmp_path / "cache").answers
    for row in rows:
        assert set(row) == {"question_id", "answer"} and isinstance(row["question_id"], int)
        assert isinstance(row["answer"], str) and row["answer"] in vocab

    # The official evaluator's rules on a split whose answers exercise each of them (images of val2014).
    # Per question: the answers, the answer type, and by hand, the accuracy of every vocabulary entry that can
    # score (write_vqa's training vocabulary: red/blue/green, dark <colour>, yes, no, maybe, 1, 2); any other
    # prediction scores 0.
    twins = [{"answer": a, "answer_confidence": "yes"} for a in ["no"] * 4 + ["yes"] * 6]  # no answer_id
    rules = [
        # mixed -> processed: "Red!" -> "red" (2 of 10 -> 0.6), "blue." -> "blue" (8 -> 1.0)
        ("what color is the image?", ["Red!"] * 2 + ["blue."] * 8, "other", {"red": 0.6, "blue": 1.0}),
        # ten identical "Red": nothing processed, "red" != "Red" -> every entry scores 0
        ("what color is the image?", ["Red"] * 10, "other", {}),
        ("what color is the image?", ["red"] * 10, "other", {"red": 1.0}),
        # newline/tab cleaned first: yes x8, no x2 -> yes 1.0, no 0.6
        ("is the image red?", ["yes\n"] * 5 + [" yes"] * 3 + ["\tno"] * 2, "yes/no", {"yes": 1.0, "no": 0.6}),
        # number words mapped on the human side too: "2" x3 (-> 0.9), "1" x7 (-> 1.0)
        ("how many colors are there?", ["two"] * 2 + ["Two."] + ["one"] * 3 + ["1"] * 4, "number",
         {"2": 0.9, "1": 1.0}),
        # ten identical "one": not mapped, so "1" scores 0
        ("how many colors are there?", ["one"] * 10, "number", {}),
        # articles dropped: "a red" -> red (1 -> 0.3), "the blue" -> blue (3 -> 0.9); "dont know" -> "don't know"
        ("what color is the image?", ["a red"] + ["the blue"] * 3 + ["dont know"] * 6, "other",
         {"red": 0.3, "blue": 0.9}),
        # entries without answer_id: equal dicts drop each other; "no": (4 x 0 + 6 x 1) / 10, "yes": 4 / 10
        ("is it dark?", twins, "yes/no", {"no": 0.6, "yes": 0.4}),
        # "dark-red" -> "dark red" (a mark touching no space becomes one): 4 -> 1.0; maybe 6 -> 1.0
        ("what color is the image?", ["dark-red"] * 3 + ["dark red"] + ["maybe"] * 6, "other",
         {"dark red": 1.0, "maybe": 1.0}),
    ]
    # Whatever the tiny model answers, some questions score it by rules an older evaluator did not have: per
    # vocabulary entry v, the humans' "the v" is processed to "v" where they disagree (3 of 10 -> 0.9), and
    # four equal entries without answer_id drop each other (v: 6 others see 4 matches -> 6 / 10 = 0.6).
    for v in vocab:
        rules.append(("what is it?", [f"the {v}"] * 3 + ["zzz"] * 7, "other", {v: 0.9}))
        twins_v = [{"answer": a, "answer_confidence": "yes"} for a in [v] * 4 + ["zzz"] * 6]
        rules.append(("what is it?", twins_v, "other", {v: 0.6}))
    _write_split(data, "rules2014", [r[:3] for r in rules], image_id=11)
    checked = tmp_path / "rules"
    proc = _run(
        "eval.py",
        [*common, f"ckpt_path={ckpt}", "split=rules2014", "+task.image_splits.rules2014=val2014",
         f"hydra.run.dir={checked}"],
        tmp_path, tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    predicted = {r["question_id"]: r["answer"] for r in json.loads((checked / "predictions.json").read_text())}
    assert sorted(predicted) == [900000 + k for k in range(len(rules))]
    scores: dict[str, list[float]] = {}
    for k, (_, _, answer_type, table) in enumerate(rules):
        score = table.get(predicted[900000 + k], 0.0)
        scores.setdefault("", []).append(score)
        scores.setdefault("_" + answer_type.replace("/", "_"), []).append(score)
    metrics = json.loads((checked / "metrics.json").read_text())
    for suffix, values in scores.items():
        assert metrics[f"rules2014/acc{suffix}"] == pytest.approx(sum(values) / len(values), abs=1e-6), suffix
