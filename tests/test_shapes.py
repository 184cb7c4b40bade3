"""Tests for the procedurally generated shapes VQA task."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from entrypoints import FAST, run, train_one_epoch
from PIL import Image

from fusion.tasks.shapes import COLORS, POSITIONS, SHAPES, ShapesTask, answer_vocabulary

SMALL = {"num_train": 40, "num_val": 10, "num_test": 10}


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> ShapesTask:
    t = ShapesTask(tmp_path_factory.mktemp("data"), **SMALL)
    t.prepare_data()
    return t


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def read_scene(path: Path) -> dict[str, tuple[str, str]]:
    """Recover ``{position: (color, shape)}`` from the pixels alone, independently of the generator."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    size = pixels.shape[0]
    half = size // 2
    palette = {rgb: name for name, rgb in COLORS.items()}
    scene = {}
    for position in POSITIONS:
        ys = slice(0, half) if position.startswith("top") else slice(half, size)
        xs = slice(0, half) if position.endswith("left") else slice(half, size)
        cell = pixels[ys, xs]
        mask = cell.any(axis=-1)
        # Objects stay clear of the cell border, so they can neither touch nor be cut by the quadrants.
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        if not mask.any():
            continue
        colors = {tuple(int(v) for v in rgb) for rgb in cell[mask]}
        assert len(colors) == 1, f"{path} {position}: more than one colour {colors}"
        (rgb,) = colors
        assert rgb in palette, f"{path} {position}: colour {rgb} not in the palette"
        rows, cols = np.nonzero(mask)
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        fill = mask.sum() / (height * width)
        # Area of the bounding box covered: square 1, circle pi/4, triangle 1/2.
        shape = "square" if fill > 0.93 else "circle" if fill > 0.66 else "triangle"
        assert fill > 0.93 or 0.70 < fill < 0.88 or 0.42 < fill < 0.62, f"{path} {position}: fill {fill}"
        scene[position] = (palette[rgb], shape)
    return scene


def oracle(question: str, scene: dict[str, tuple[str, str]]) -> str:
    """Answer ``question`` from a pixel-recovered scene; fails if the question is ambiguous."""
    colors, shapes = "|".join(COLORS), "|".join(SHAPES)

    def only(matches: list[str]) -> str:
        assert len(matches) == 1, f"{question!r} is ambiguous or unanswerable in {scene}"
        return matches[0]

    items = scene.items()
    if m := re.fullmatch(r"what color is the shape in the (.+)\?", question):
        return scene[m[1]][0]
    if m := re.fullmatch(r"what shape is in the (.+)\?", question):
        return scene[m[1]][1]
    if m := re.fullmatch(rf"what color is the ({shapes})\?", question):
        return only([c for _, (c, s) in items if s == m[1]])
    if m := re.fullmatch(rf"what shape is the ({colors}) object\?", question):
        return only([s for _, (c, s) in items if c == m[1]])
    if question == "how many shapes are there?":
        return str(len(scene))
    if m := re.fullmatch(rf"how many ({colors}) shapes are there\?", question):
        return str(sum(c == m[1] for c, _ in scene.values()))
    if m := re.fullmatch(rf"how many ({shapes})s are there\?", question):
        return str(sum(s == m[1] for _, s in scene.values()))
    if m := re.fullmatch(rf"where is the ({shapes})\?", question):
        return only([p for p, (_, s) in items if s == m[1]])
    if m := re.fullmatch(rf"where is the ({colors}) object\?", question):
        return only([p for p, (c, _) in items if c == m[1]])
    if m := re.fullmatch(rf"where is the ({colors}) ({shapes})\?", question):
        return only([p for p, (c, s) in items if (c, s) == (m[1], m[2])])
    raise AssertionError(f"unknown question template: {question!r}")


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a, b = ShapesTask(tmp_path / "a", **SMALL), ShapesTask(tmp_path / "b", **SMALL)
    a.prepare_data()
    b.prepare_data()
    assert a.data_dir.name == b.data_dir.name
    files_a, files_b = folder_bytes(a.data_dir), folder_bytes(b.data_dir)
    assert len([f for f in files_a if f.endswith(".png")]) == sum(SMALL.values())
    assert files_a == files_b


def test_different_seed_gives_different_data(tmp_path: Path, task: ShapesTask) -> None:
    other = ShapesTask(tmp_path, **SMALL, seed=1)
    other.prepare_data()
    assert other.data_dir.name != task.data_dir.name
    for split in task.splits:
        assert [e.question for e in other.examples(split)] != [e.question for e in task.examples(split)]
    image = "images/train/000000.png"
    assert (other.data_dir / image).read_bytes() != (task.data_dir / image).read_bytes()


def test_parameters_pick_different_folders(tmp_path: Path) -> None:
    base = ShapesTask(tmp_path, **SMALL)
    assert ShapesTask(tmp_path, **SMALL, image_size=48).data_dir != base.data_dir
    assert ShapesTask(tmp_path, **{**SMALL, "num_val": 11}).data_dir != base.data_dir
    assert ShapesTask(tmp_path, **SMALL).data_dir == base.data_dir


def test_answers_are_fixed_and_cover_every_type(task: ShapesTask) -> None:
    # Known before any generation, so the head size never depends on the data.
    assert task.answers == answer_vocabulary(3) == [*COLORS, *SHAPES, "1", "2", "3", *POSITIONS]
    assert len(set(task.answers)) == len(task.answers)
    assert task.answer_types == ["color", "shape", "count", "position"]
    allowed = {
        "color": set(COLORS),
        "shape": set(SHAPES),
        "count": {"1", "2", "3"},
        "position": set(POSITIONS),
    }
    for split in task.splits:
        rows = json.loads((task.data_dir / f"{split}_questions.json").read_text())
        assert {r["answer_type"] for r in rows} == set(task.answer_types)
        for row, example in zip(rows, task.examples(split), strict=True):
            assert row["answer"] in allowed[row["answer_type"]]
            assert task.answers[example.label] == row["answer"]
            assert row["question"] == row["question"].lower()


def _text_batch(task: ShapesTask, examples) -> dict:
    return {
        "question_ids": [e.question_id for e in examples],
        "labels": torch.tensor([e.label for e in examples]),
        "answer_types": torch.tensor([task.answer_types.index(e.answer_type) for e in examples]),
    }


def test_generated_answers_are_right_only_as_the_exact_vocabulary_answer(task: ShapesTask) -> None:
    assert task.open_ended
    val = task.examples("val")

    def first(answer_type: str, skip: int = 0):
        return [e for e in val if e.answer_type == answer_type][skip]

    examples = [first("color"), first("count"), first("color", 1), first("position"), first("shape")]
    answers = [task.answers[e.label] for e in examples]
    texts = [answers[0], "magenta", " " + answers[2], answers[3].upper(), answers[4]]
    batch = _text_batch(task, examples)
    metric = task.metric()
    task.update_metric_text(metric, texts, batch)
    out = {k: float(v) for k, v in metric.compute().items()}
    # Right: the first colour and the shape, exactly the answer; a word outside the vocabulary, a leading space and
    # upper case are wrong (exact string equality, as the classifier's argmax is an exact vocabulary entry).
    assert out == pytest.approx({"": 2 / 5, "color": 0.5, "shape": 1.0, "count": 0.0, "position": 0.0})
    # The same as the logits path picking the same entries (a wrong string as some other entry).
    picks = [e.label if t == a else (e.label + 1) % task.num_classes
             for e, t, a in zip(examples, texts, answers, strict=True)]
    from_logits = task.metric()
    task.update_metric(from_logits, torch.nn.functional.one_hot(torch.tensor(picks), task.num_classes).float(), batch)
    assert {k: float(v) for k, v in from_logits.compute().items()} == out
    assert task.prediction_rows_text(texts, batch) == [
        {"question_id": e.question_id, "answer": t} for e, t in zip(examples, texts, strict=True)
    ]
    # Never right without a label: an unknown string does not match the -1 of an unlabelled example.
    metric = task.metric()
    task.update_metric_text(metric, ["magenta"], {**_text_batch(task, examples[:1]), "labels": torch.tensor([-1])})
    assert int(metric.correct.sum()) == 0 and int(metric.total.sum()) == 1
    with pytest.raises(TypeError, match="must be strings"):
        task.update_metric_text(task.metric(), [3], _text_batch(task, examples[:1]))


def test_images_show_what_the_questions_say(task: ShapesTask) -> None:
    scenes: dict[Path, dict[str, tuple[str, str]]] = {}
    seen_types: Counter[str] = Counter()
    for split in task.splits:
        for e in task.examples(split):
            if e.image_path not in scenes:
                scenes[e.image_path] = read_scene(e.image_path)
                assert 1 <= len(scenes[e.image_path]) <= task.max_objects
            assert oracle(e.question, scenes[e.image_path]) == task.answers[e.label], e
            seen_types[e.answer_type] += 1
    assert set(seen_types) == set(task.answer_types)


def test_examples_fields_and_layout(task: ShapesTask) -> None:
    meta = json.loads((task.data_dir / "meta.json").read_text())
    assert meta["complete"] is True and meta["params"]["seed"] == 0 and meta["answers"] == task.answers
    for split in task.splits:
        examples = task.examples(split)
        assert examples == task.examples(split)
        per_image = Counter(e.image_key for e in examples)
        assert len(per_image) == SMALL[f"num_{split}"]
        assert set(per_image.values()) <= {2, 3}
        assert len({e.question_id for e in examples}) == len(examples)
        for e in examples:
            assert isinstance(e.question_id, str)
            assert e.image_path.is_absolute() and e.image_path.is_file()
            assert e.image_key == f"shapes/{task.data_dir.name}/{split}/{e.image_path.stem}"
            assert e.image_path.parent == task.data_dir / "images" / split


def test_examples_are_cached(tmp_path: Path) -> None:
    t = ShapesTask(tmp_path, num_train=4, num_val=2, num_test=2)
    t.prepare_data()
    first = t.examples("val")
    (t.data_dir / "val_questions.json").unlink()
    assert t.examples("val") == first


def test_examples_before_prepare_data_generate_the_same_data(tmp_path: Path, task: ShapesTask) -> None:
    # What eval.py and the analyses do on a machine where training never ran: read a split first.
    fresh = ShapesTask(tmp_path, **SMALL)
    assert not fresh.data_dir.exists()
    def rows(t: ShapesTask) -> list[tuple]:
        return [(e.question_id, e.image_key, e.question, e.label) for e in t.examples("val")]

    assert rows(fresh) == rows(task)
    assert fresh.is_complete()
    assert folder_bytes(fresh.data_dir) == folder_bytes(task.data_dir)


def test_eval_generates_the_shapes_data_training_used(tmp_path: Path) -> None:
    """eval.py on a machine where the shapes data was never generated generates it, as training does."""
    args = ["+experiment=shapes", *FAST, "task.num_train=8", "task.num_val=4", "task.num_test=4"]
    run_dir = tmp_path / "train_run"
    train_one_epoch(args, run_dir, tmp_path)
    elsewhere = tmp_path / "elsewhere"  # its own, empty FUSION_DATA_DIR (entrypoints.run: <cwd>/data)
    elsewhere.mkdir()
    out = tmp_path / "eval_run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run("eval.py", [*args, f"ckpt_path={ckpt}", "split=val", f"hydra.run.dir={out}"], elsewhere)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "prepare_data" not in proc.stderr
    assert {"val/acc", "val/majority_acc"} <= set(json.loads((out / "metrics.json").read_text()))
    (trained,) = (tmp_path / "data" / "shapes").iterdir()
    (generated,) = (elsewhere / "data" / "shapes").iterdir()
    assert generated.name == trained.name and folder_bytes(generated) == folder_bytes(trained)
    predictions = json.loads((out / "predictions.json").read_text())
    val = json.loads((trained / "val_questions.json").read_text())
    assert [p["question_id"] for p in predictions] == [q["question_id"] for q in val]


def test_unknown_split_names_allowed_splits(task: ShapesTask) -> None:
    with pytest.raises(ValueError, match=r"'dev'.*\['train', 'val', 'test'\]"):
        task.examples("dev")


def test_half_written_folder_is_not_complete(tmp_path: Path) -> None:
    t = ShapesTask(tmp_path, **SMALL)
    # What a generator killed mid-way leaves behind: a temp sibling with some images and no meta.json.
    junk = t.data_dir.parent / f".{t.data_dir.name}.tmp-123-deadbeef"
    (junk / "images" / "train").mkdir(parents=True)
    (junk / "images" / "train" / "000000.png").write_bytes(b"not a png")
    (junk / "train_questions.json").write_text("[")
    assert not t.is_complete(junk)
    assert not t.is_complete()
    t.prepare_data()
    assert t.is_complete()
    assert len(t.examples("train")) >= 2 * SMALL["num_train"]


def test_failed_generation_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = ShapesTask(tmp_path, **SMALL)

    def crash(objects: object, image_size: int) -> Image.Image:
        raise RuntimeError("killed")

    monkeypatch.setattr("fusion.tasks.shapes.render_scene", crash)
    with pytest.raises(RuntimeError, match="killed"):
        t.prepare_data()
    assert not t.data_dir.exists()
    assert list(t.data_dir.parent.iterdir()) == []
    monkeypatch.undo()
    t.prepare_data()
    assert t.is_complete()


def test_race_loser_uses_winners_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    winner, loser = ShapesTask(tmp_path, **SMALL), ShapesTask(tmp_path, **SMALL)
    generate = loser._generate

    def generate_then_lose(folder: Path) -> None:
        generate(folder)
        winner.prepare_data()  # finishes and renames into place while the loser is still working

    monkeypatch.setattr(loser, "_generate", generate_then_lose)
    loser.prepare_data()
    assert loser.is_complete()
    assert [p.name for p in loser.data_dir.parent.iterdir()] == [loser.data_dir.name]
    assert loser.examples("val") == winner.examples("val")


def test_hand_made_incomplete_folder_raises(tmp_path: Path) -> None:
    t = ShapesTask(tmp_path, **SMALL)
    (t.data_dir / "images").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="not a complete"):
        t.prepare_data()


def test_majority_baseline_is_low(tmp_path: Path) -> None:
    t = ShapesTask(tmp_path, num_train=300, num_val=300, num_test=0)
    t.prepare_data()
    assert t.majority_accuracy("val") < 0.15
    types = Counter(e.answer_type for e in t.examples("val"))
    assert min(types.values()) > 0.2 * sum(types.values())


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"num_train": -1}, "num_train"),
        ({"num_val": -5}, "num_val"),
        ({"num_test": 1.5}, "num_test"),
        ({"image_size": 16}, "image_size"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 5}, "max_objects"),
        ({"seed": "0"}, "seed"),
    ],
)
def test_bad_parameters_raise(tmp_path: Path, kwargs: dict, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        ShapesTask(tmp_path, **kwargs)


@pytest.mark.parametrize("max_objects", [1, 4])
def test_extreme_object_counts(tmp_path: Path, max_objects: int) -> None:
    t = ShapesTask(tmp_path, num_train=20, num_val=0, num_test=0, image_size=32, max_objects=max_objects)
    t.prepare_data()
    assert t.answers[-len(POSITIONS) - 1] == str(max_objects)
    # A split of no images is generated, but reading it is refused like any empty split.
    with pytest.raises(ValueError, match=rf"{re.escape(str(t.questions_path('val')))}: split 'val' of task 'shapes' "
                       "has no examples"):
        t.examples("val")
    for e in t.examples("train"):
        assert oracle(e.question, read_scene(e.image_path)) == t.answers[e.label]
