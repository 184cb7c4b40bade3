"""eval.py mode=causal_trace on a tiny trained checkpoint: restoring everything gives the clean score exactly,
restoring nothing the corrupted one; word swaps, encoder swaps and a pair file."""

import json

import pytest
import torch
from analysis_helpers import ENCODERS, run_mode, tiny_checkpoint

from fusion.analysis.causal_trace import _order, position_labels
from fusion.analysis.pairs import DEFAULT_SWAPS, swap_word
from fusion.analysis.shapes_scene import scene_answers
from fusion.model import CLS_GROUP, TEXT_GROUP


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


def test_position_labels():
    groups = torch.tensor([CLS_GROUP, TEXT_GROUP, TEXT_GROUP, 0, 0, 1])
    assert position_labels(groups, ["a", "b"]) == ["[CLS]", "text 0", "text 1", "a[0]", "a[1]", "b[0]"]


def test_position_labels_name_the_image_when_an_example_has_two():
    # NLVR2: image 0's tokens (a, a, b), then image 1's (the fuser's token groups repeated per image).
    groups = torch.tensor([CLS_GROUP, TEXT_GROUP, 0, 0, 1, 0, 0, 1])
    labels = position_labels(groups, ["a", "b"], num_images=2)
    assert labels == ["[CLS]", "text 0", "img0 a[0]", "img0 a[1]", "img0 b[0]", "img1 a[0]", "img1 a[1]",
                      "img1 b[0]"]
    # The report's order: [CLS], text, then image by image, each encoder's tokens in order.
    assert _order(list(reversed(labels)), ["a", "b"]) == labels
