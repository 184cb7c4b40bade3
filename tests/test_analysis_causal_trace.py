"""eval.py mode=causal_trace on a tiny trained checkpoint: restoring everything gives the clean score exactly,
restoring nothing the corrupted one; word swaps, encoder swaps and a pair file."""

import json
import random

import pytest
import torch
from analysis_helpers import ENCODERS, run_mode, tiny_checkpoint

from fusion.analysis.causal_trace import DEFAULT_SWAPS, position_labels, read_pairs, select, swap_word
from fusion.analysis.shapes_scene import answer_changing_swap, read_scene, scene_answers, word_swaps
from fusion.model import CLS_GROUP, TEXT_GROUP
from fusion.tasks.shapes import SceneObject, candidate_questions, render_scene, sample_scene


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def text_trace(checkpoint):
    ckpt, workdir = checkpoint
    results = run_mode("causal_trace", ckpt, workdir, "analysis.causal_trace.max_pairs=24",
                       "analysis.causal_trace.min_effect=0.0")
    return results, workdir / "eval_causal_trace" / "causal_trace"


def _check_exact(results):
    assert results["restore_all_exact"] and results["restore_none_exact"]
    assert results["restore_all_score"] == [results["clean_score"]] * 2  # two layers
    assert results["restore_none_score"] == [results["corrupted_score"]] * 2
    assert results["clean_score"] > results["corrupted_score"]


def test_restoring_every_position_recovers_the_clean_score_exactly_and_none_the_corrupted(text_trace):
    results, _ = text_trace
    # The built-in shapes pairs are the swaps that change the answer (44 of the 300 val questions here; the
    # 1-epoch model's answer moves on 21 of them, min_effect 0).
    assert 8 <= results["num_pairs"] <= 24 and results["corrupt"] == "text"
    assert results["num_pairs"] <= results["candidate_pairs"] and 0 <= results["answer_changed_share"] <= 1
    _check_exact(results)
    for pair in results["pairs"]:
        assert pair["clean_score"] > pair["corrupted_score"]


def test_built_in_shapes_pairs_change_the_gold_answer(checkpoint, text_trace):
    _, workdir = checkpoint
    results, _ = text_trace
    folder = next((workdir / "data" / "shapes").glob("*/val_questions.json")).parent
    gold = {e["question_id"]: e for e in json.loads((folder / "val_questions.json").read_text())}
    for pair in results["pairs"]:
        example = gold[pair["question_id"]]
        answers = scene_answers(folder / "images" / "val" / f"{example['image_id']}.png")
        assert answers[pair["question"]] == example["answer"]
        assert answers[pair["corrupted_question"]] != example["answer"]


def test_position_and_head_tables(text_trace):
    results, folder = text_trace
    labels = results["positions"]
    assert labels[0] == "[CLS]" and labels[1] == "text 0"
    assert sum(label.startswith(f"{ENCODERS[0]}[") for label in labels) == 17
    recovery = torch.tensor(results["position_recovery"])  # (layers, positions)
    assert recovery.shape == (2, len(labels))
    # After the last block only [CLS] reaches the head: restoring it there restores the answer exactly.
    assert recovery[1, 0] == pytest.approx(1.0, abs=1e-5)
    assert recovery[1, 1:].abs().max() < 1e-5
    assert torch.tensor(results["head_recovery"]).shape == (2, 2)
    report = (folder / "report.md").read_text()
    for png in ("positions.png", "heads.png"):
        assert (folder / png).stat().st_size > 10_000 and f"]({png})" in report
    assert (folder / "positions.csv").read_text().count("\n") == 1 + 2 * len(labels)


def test_encoder_swap_and_pair_file(checkpoint, tmp_path):
    ckpt, workdir = checkpoint
    results = run_mode("causal_trace", ckpt, workdir, "analysis.causal_trace.corrupt=encoder:dino_tiny",
                       "analysis.causal_trace.max_pairs=16", "analysis.causal_trace.min_effect=0.0")
    _check_exact(results)
    assert results["num_pairs"] == 16

    pairs = tmp_path / "pairs.json"
    examples = json.loads(next((workdir / "data" / "shapes").glob("*/val_questions.json")).read_text())
    rows = [{"question_id": e["question_id"], "corrupted_question": swap_word(e["question"], DEFAULT_SWAPS)}
            for e in examples[:40] if swap_word(e["question"], DEFAULT_SWAPS)]
    pairs.write_text(json.dumps(rows))
    results = run_mode("causal_trace", ckpt, workdir, f"analysis.causal_trace.pairs={pairs}",
                       "analysis.causal_trace.min_effect=0.0")
    _check_exact(results)
    assert {p["question_id"] for p in results["pairs"]} <= {r["question_id"] for r in rows}


def test_swap_word_keeps_the_rest_of_the_question():
    assert swap_word("what color is the shape in the top left?", DEFAULT_SWAPS) == (
        "what color is the shape in the bottom left?"
    )
    assert swap_word("how many circles are there?", DEFAULT_SWAPS) == "how many squares are there?"
    assert swap_word("where is the purple square?", DEFAULT_SWAPS) == "where is the red square?"
    assert swap_word("how many shapes are there?", DEFAULT_SWAPS) is None


def test_position_labels_and_select():
    groups = torch.tensor([CLS_GROUP, TEXT_GROUP, TEXT_GROUP, 0, 0, 1])
    assert position_labels(groups, ["a", "b"]) == ["[CLS]", "text 0", "text 1", "a[0]", "a[1]", "b[0]"]
    batch = {"x": torch.arange(4), "features": {"a": torch.arange(8).view(4, 2)}, "ids": list("wxyz"), "k": 3}
    out = select(batch, torch.tensor([2, 0]))
    assert out["x"].tolist() == [2, 0] and out["features"]["a"].tolist() == [[4, 5], [0, 1]]
    assert out["ids"] == ["y", "w"] and out["k"] == 3


def test_read_scene_recovers_every_generated_scene_from_its_pixels():
    rng = random.Random(0)
    for size in (64, 32, 96):
        for _ in range(150):
            objects = sample_scene(rng, size, 4)
            read = read_scene(render_scene(objects, size))
            assert [(o.color, o.shape, o.cell, o.box) for o in read] == [
                (o.color, o.shape, o.cell, o.box) for o in objects
            ]


def test_answer_changing_swap_names_another_object_of_the_scene():
    objects = [SceneObject("red", "circle", 0, (2, 2, 20, 20)), SceneObject("blue", "square", 3, (40, 40, 60, 60))]
    answers = {q: a for qs in candidate_questions(objects).values() for q, a in qs}
    assert answer_changing_swap("what color is the circle?", "red", answers, DEFAULT_SWAPS) == (
        "what color is the square?"
    )
    # "top left" -> "bottom left" is no question about this scene (empty cell); "top right" neither;
    # "bottom right" takes two swaps, so a one-word swap gives no answer-changing pair.
    assert answer_changing_swap("what shape is in the top left?", "circle", answers, DEFAULT_SWAPS) is None
    # Colours are tried in group order from the next one: green (absent), blue (present, another answer).
    assert answer_changing_swap("where is the red object?", "top left", answers, DEFAULT_SWAPS) == (
        "where is the blue object?"
    )
    assert answer_changing_swap("how many shapes are there?", "2", answers, DEFAULT_SWAPS) is None
    assert list(word_swaps("how many circles are there?", [["circle", "square", "triangle"]])) == [
        "how many squares are there?", "how many triangles are there?"]


def test_pair_files_json_and_jsonl(tmp_path):
    rows = [{"question_id": 11000, "corrupted_question": "what color is the box?"},
            {"question_id": "a_1", "corrupted_question": "x"}]
    expected = {"11000": "what color is the box?", "a_1": "x"}
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "one.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert read_pairs(tmp_path / "p.json") == read_pairs(tmp_path / "p.jsonl") == expected
    assert read_pairs(tmp_path / "one.jsonl") == {"11000": "what color is the box?"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"pairs=.*bad\.jsonl: line 2 is neither"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "keys.json").write_text(json.dumps([{"question_id": 1, "question": "q"}]))
    with pytest.raises(ValueError, match=r"keys\.json: pair 0 is .*expected \{\"question_id\""):
        read_pairs(tmp_path / "keys.json")
    with pytest.raises(FileNotFoundError, match=r"pairs=.*missing\.json: no such file"):
        read_pairs(tmp_path / "missing.json")
