"""eval.py mode=causal_trace on a tiny trained checkpoint: restoring everything gives the clean score exactly,
restoring nothing the corrupted one; word swaps, encoder swaps and a pair file."""

import json

import pytest
import torch
from analysis_helpers import ENCODERS, run_mode, tiny_checkpoint

from fusion.analysis.causal_trace import DEFAULT_SWAPS, position_labels, select, swap_word
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
    assert results["num_pairs"] == 24 and results["corrupt"] == "text"
    _check_exact(results)
    for pair in results["pairs"]:
        assert pair["clean_score"] > pair["corrupted_score"]


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
