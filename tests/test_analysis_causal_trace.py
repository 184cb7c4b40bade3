"""eval.py mode=causal_trace on a tiny trained checkpoint: restoring everything gives the clean score exactly,
restoring nothing the corrupted one; word swaps, encoder swaps and a pair file; undefined positions (no traced
pair has them) are null, not NaN; head recovery of a head the model ignores is 0."""

import csv
import json
import math

import pytest
import torch
from analysis_helpers import ENCODERS, check_wandb, run_mode, tiny_checkpoint

from fusion.analysis.causal_trace import _order, position_labels
from fusion.analysis.pairs import DEFAULT_SWAPS, swap_word
from fusion.analysis.shapes_scene import scene_answers
from fusion.model.transformer import CLS_GROUP, TEXT_GROUP


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def text_trace(checkpoint):
    ckpt, workdir = checkpoint
    # With a wandb logger too: the tables and figures go there as well (offline run in the run folder).
    results = run_mode("causal_trace", ckpt, workdir, "analysis.causal_trace.max_pairs=24",
                       "analysis.causal_trace.min_effect=0.0", "logger=wandb")
    return results, workdir / "eval_causal_trace" / "causal_trace"


@pytest.fixture(scope="module")
def short_pairs(checkpoint, tmp_path_factory):
    """A pair file of questions shorter than the batch's longest (9 words): their lengths differ (5 to 7 words),
    and the last text positions of the batch are padding in every traced pair."""
    ckpt, workdir = checkpoint
    examples = json.loads(next((workdir / "data" / "shapes").glob("*/val_questions.json")).read_text())
    assert max(len(e["question"].split()) for e in examples[:100]) == 9  # in the first batch of 100
    rows = [{"question_id": e["question_id"], "corrupted_question": swap_word(e["question"], DEFAULT_SWAPS)}
            for e in examples[:40] if swap_word(e["question"], DEFAULT_SWAPS) and len(e["question"].split()) < 9]
    pairs = tmp_path_factory.mktemp("pairs") / "pairs.json"
    pairs.write_text(json.dumps(rows))
    results = run_mode("causal_trace", ckpt, workdir, f"analysis.causal_trace.pairs={pairs}",
                       "analysis.causal_trace.min_effect=0.0", name="eval_causal_trace_pairs")
    return results, rows, workdir / "eval_causal_trace_pairs" / "causal_trace"


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
    with open(folder / "heads.csv") as f:
        heads = list(csv.DictReader(f))
    assert [(int(r["layer"]), int(r["head"])) for r in heads] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [float(r["recovery"]) for r in heads] == [v for row in results["head_recovery"] for v in row]
    assert results["figures"]["heads"]["values"] == results["head_recovery"]
    assert results["figures"]["positions"]["rows"] == labels
    # Restoring every head of a layer gives what restoring its attention output does, bitwise.
    assert results["restore_heads_exact"] and len(results["restore_attention_score"]) == 2


def test_tables_and_figures_are_in_wandb(text_trace):
    _, folder = text_trace
    summary = check_wandb(folder.parent, "causal_trace")
    assert {"analysis/causal_trace/table/heads", "analysis/causal_trace/heads"} <= set(summary)


def test_a_pair_file_of_shorter_questions_leaves_positions_undefined_not_nan(short_pairs):
    results, rows, folder = short_pairs  # run_mode parsed results.json strictly: no bare NaN
    _check_exact(results)
    assert {p["question_id"] for p in results["pairs"]} <= {r["question_id"] for r in rows}
    # Traced pairs of differing lengths in one batch: late text positions have fewer pairs, the batch's last none.
    lengths = {len(p["question"].split()) for p in results["pairs"]}
    assert len(lengths) >= 2 and max(lengths) < 9
    labels, counts = results["positions"], results["position_pairs"]
    assert counts[0] == results["num_pairs"] and 0 < min(c for c in counts if c) < results["num_pairs"]
    missing = [j for j, c in enumerate(counts) if c == 0]
    assert missing and all(labels[j].startswith("text ") for j in missing)
    for layer in range(2):
        for j, c in enumerate(counts):
            defined = results["position_recovery"][layer][j] is not None
            assert defined == (c > 0) and (results["position_score"][layer][j] is not None) == (c > 0)
    # The ranking holds defined recoveries only, highest first.
    top = [t["recovery"] for t in results["top_positions"]]
    assert top and all(math.isfinite(v) for v in top) and top == sorted(top, reverse=True)
    assert not {t["position"] for t in results["top_positions"]} & {labels[j] for j in missing}
    # positions.csv: empty cells; the heatmap's matrix (results.json) null, i.e. masked in the figure.
    with open(folder / "positions.csv") as f:
        table = list(csv.DictReader(f))
    empty = [r for r in table if r["recovery"] == ""]
    assert len(empty) == 2 * len(missing) and all(r["pairs"] == "0" and r["score"] == "" for r in empty)
    heatmap = results["figures"]["positions"]["values"]  # (positions, layers)
    assert [j for j, row in enumerate(heatmap) if row == [None, None]] == missing


def _zero_head(ckpt, path, layer, head, head_dim):
    """A copy of ``ckpt`` whose attention projection ignores one head: its input columns set to 0."""
    checkpoint = torch.load(ckpt, weights_only=True)
    weight = checkpoint["state_dict"][f"fusion.blocks.{layer}.attn.proj.weight"]
    weight[:, head * head_dim : (head + 1) * head_dim] = 0
    torch.save(checkpoint, path)
    return path


def test_head_recovery_of_a_head_the_model_ignores_is_zero(checkpoint, tmp_path):
    ckpt, workdir = checkpoint
    zeroed = _zero_head(ckpt, tmp_path / "zeroed.ckpt", layer=0, head=0, head_dim=64 // 2)
    results = run_mode("causal_trace", zeroed, workdir, "analysis.causal_trace.corrupt=encoder:dino_tiny",
                       "analysis.causal_trace.max_pairs=16", "analysis.causal_trace.min_effect=0.0",
                       name="eval_causal_trace_zeroed")
    _check_exact(results)
    assert results["num_pairs"] == 16
    recovery, score = results["head_recovery"], results["head_score"]
    # Restoring layer 0's head 0 changes nothing the model reads: exactly the corrupted score.
    assert recovery[0][0] == 0.0 and score[0][0] == results["corrupted_score"]
    assert recovery[0][1] != 0.0
    # So its head 1 alone carries the whole attention output: restoring it is restoring all heads, bitwise
    # equal to restoring the attention block's output.
    assert results["restore_heads_exact"]
    assert score[0][1] == results["restore_attention_score"][0]
    assert results["restore_attention_score"][1] != results["corrupted_score"]


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
