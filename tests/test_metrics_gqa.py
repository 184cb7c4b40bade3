"""GQAMetric (fusion.metrics.gqa): ids through tensors, the metric in one process and under two gloo
processes, the task's log of the measures a missing file leaves out, and random splits against the script."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_gqa import _task, official_eval, write_gqa
from test_metrics_gqa_official import PREDICTIONS, _questions, op

from fusion.metrics.gqa import GQAMetric, decode_ids, encode_ids
from fusion.metrics.gqa_official import GQAQuestion, official_scores
from fusion.tasks.gqa import STRUCTURAL_TYPES


def test_ids_round_trip_through_tensors() -> None:
    ids = ["02930152", "q", "", "élan-7"]
    assert decode_ids(*encode_ids(ids)) == ids
    assert decode_ids(*encode_ids([])) == []


ANSWERS = ["red", "yes", "blue", "no", "material", "green"]


def _lookup(question_ids):  # module level: the gloo workers unpickle it
    return _questions()


def _update(metric: GQAMetric, qids: list[str]) -> None:
    metric.update(qids, torch.tensor([ANSWERS.index(PREDICTIONS[q]) for q in qids]))


def test_metric_scores_everything_it_was_given(caplog) -> None:
    metric = GQAMetric(ANSWERS, _lookup)
    _update(metric, ["q1", "q2", "e1"])
    _update(metric, ["q3", "q4", "u1", "e2"])
    assert metric.predictions() == PREDICTIONS
    with caplog.at_level(logging.INFO, logger="fusion.metrics.gqa"):
        out = metric.compute()
    expected = official_scores(_questions(), PREDICTIONS).as_metrics()
    assert {k: float(v) for k, v in out.items()} == pytest.approx(expected)
    # States merged from another process's metric (what DDP's sync does) give the same numbers.
    first, second = GQAMetric(ANSWERS, _lookup), GQAMetric(ANSWERS, _lookup)
    _update(first, ["q1", "q3", "e2"])
    _update(second, ["q2", "q4", "u1", "e1"])
    first.merge_state(second)
    assert {k: float(v) for k, v in first.compute().items()} == pytest.approx(expected)
    # A measure left out is logged, once.
    metric = GQAMetric(ANSWERS, lambda ids: {"q": GQAQuestion("red", "query", entailed=())})
    metric.update(["q"], torch.tensor([0]))
    with caplog.at_level(logging.INFO, logger="fusion.metrics.gqa"):
        metric.compute()
        metric.compute()
    lines = [r.getMessage() for r in caplog.records if "binary not computed" in r.getMessage()]
    assert lines == ["GQA binary not computed: no binary question (structural type not 'query')"]


# Predicted strings a generating head may give: "Red" (case), "shape" (outside ANSWERS), "" and non-ASCII.
TEXTS = {"q1": "Red", "q2": "yes", "q3": "blue", "q4": "shape", "u1": "", "e1": "no", "e2": "vert clair é"}


def test_answer_strings_score_as_their_indices_and_outside_the_vocabulary_too() -> None:
    by_index, by_text = GQAMetric(ANSWERS, _lookup), GQAMetric(ANSWERS, _lookup)
    _update(by_index, list(PREDICTIONS))
    by_text.update_text(list(PREDICTIONS), list(PREDICTIONS.values()))
    assert by_text.predictions() == by_index.predictions() == PREDICTIONS
    assert {k: float(v) for k, v in by_text.compute().items()} == {k: float(v) for k, v in by_index.compute().items()}
    # Indices and strings in one metric, and merged from another process's metric.
    mixed, other = GQAMetric(ANSWERS, _lookup), GQAMetric(ANSWERS, _lookup)
    _update(mixed, ["q1", "q2"])
    mixed.update_text(["q3", "q4", "u1"], [TEXTS["q3"], TEXTS["q4"], TEXTS["u1"]])
    other.update_text(["e1", "e2"], [TEXTS["e1"], TEXTS["e2"]])
    mixed.merge_state(other)
    expected = {**TEXTS, "q1": PREDICTIONS["q1"], "q2": PREDICTIONS["q2"]}
    assert mixed.predictions() == expected

    metric = GQAMetric(ANSWERS, _lookup)
    metric.update_text(list(TEXTS), list(TEXTS.values()))
    assert metric.predictions() == TEXTS
    out = {k: float(v) for k, v in metric.compute().items()}
    # q1 "Red" != "red" (exact strings), q2 yes right, q3 blue right, q4 "shape" wrong -> 2/4.
    assert out[""] == 0.5 and out["open"] == 0.5 and out["binary"] == 0.5
    # Validity and plausibility: "Red" is in neither list of q1; q4 "shape" is valid and plausible by the Common rule.
    assert out["validity"] == 0.75 and out["plausibility"] == 0.75
    # Consistency: q2 right (e1 "no" right: 1.0), q3 right (e2 "vert clair é" != "green": 0.0) -> 0.5.
    assert out["consistency"] == 0.5
    # Distribution: color gold {red: 1, blue: 1}, predicted {Red: 1, blue: 1}: (0-1)^2/1 + 0 = 1 over 2 questions;
    # yesno: 0 over 1. (1 * 2 + 0 * 1) / 3 / 100.
    assert out["distribution"] == pytest.approx(2 / 3 / 100)
    # A later update counts (torchmetrics drops its cached compute()); a question predicted again: the later wins,
    # as in the official script's reading of the prediction file. q1 "red" is right now -> 3/4.
    metric.update_text(["q1"], ["red"])
    assert float(metric.compute()[""]) == 0.75
    with pytest.raises(ValueError, match="2 question ids for 1 predictions"):
        metric.update_text(["q1", "q2"], ["red"])
    with pytest.raises(ValueError, match="index 6 is not an index into the 6 answers"):
        metric.update(["q1"], torch.tensor([6]))


def _ddp_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = GQAMetric(ANSWERS, _lookup)
        # Uneven shares, one rank without any update at all in the second metric; rank 1 adds strings (a generating
        # head's answers) beside rank 0's indices.
        if rank == 0:
            _update(metric, ["q1", "q2", "q3", "q4", "u1"])
        else:
            metric.update_text(["e1", "e2"], [PREDICTIONS["e1"], PREDICTIONS["e2"]])
        lonely = GQAMetric(ANSWERS, _lookup)
        if rank == 1:
            _update(lonely, list(PREDICTIONS))
        # Answer strings outside the vocabulary, of uneven lengths (empty, non-ASCII) on both ranks.
        texts = GQAMetric(ANSWERS, _lookup)
        share = ["q1", "q2", "u1"] if rank == 0 else ["q3", "q4", "e1", "e2"]
        texts.update_text(share, [TEXTS[q] for q in share])
        out = [{k: float(v) for k, v in m.compute().items()} for m in (metric, lonely, texts)]
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def test_ddp_gathers_every_question_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_ddp_worker, args=(port, queue), nprocs=2, start_method="spawn")
    expected = official_scores(_questions(), PREDICTIONS).as_metrics()
    *indices, texts = queue.get(timeout=60)
    for out in indices:
        assert out == pytest.approx(expected)
    assert texts == pytest.approx(official_scores(_questions(), TEXTS).as_metrics())


# ---- the task: which files give which measures ---------------------------------------------------------------


def _enrich(path: Path, entailed: dict[str, list[str]]) -> None:
    data = json.loads(path.read_text())
    for qid, ids in entailed.items():
        data[qid]["entailed"] = ids
    path.write_text(json.dumps(data))


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_missing_files_skip_their_measures_with_a_log_line(tmp_path, caplog) -> None:
    data = write_gqa(tmp_path / "gqa")
    _enrich(data / "val_balanced_questions.json", {"valn110": ["valn110", "valx1"]})
    with caplog.at_level(logging.INFO, logger="fusion.tasks.gqa"):
        task = _task(data, tmp_path)
        assert len(task.examples("val")) == 6  # nothing added
    text = "\n".join(_messages(caplog))
    assert f"split val: GQA consistency not computed: {data / 'val_all_questions.json'} absent" in text
    assert (f"split val: GQA validity and plausibility not computed: no choices file has all its questions "
            f"(absent: {data / 'val_choices.json'}, {data / 'challenge_all_choices.json'})") in text
    assert "split val: GQA grounding not computed (it needs the model's attention maps)" in text
    assert task.official_questions([])["valn110"].entailed is None  # consistency left out at compute()


def test_the_all_questions_and_choices_files_bring_their_measures(tmp_path, caplog) -> None:
    data = write_gqa(tmp_path / "gqa")
    _enrich(data / "val_balanced_questions.json", {"valn110": ["valn110", "valx1", "valn111"]})
    balanced = json.loads((data / "val_balanced_questions.json").read_text())
    extra = {"imageId": "n11", "question": "Is it blue?", "answer": "no", "types": {"structural": "verify"},
             "isBalanced": False}
    (data / "val_all_questions.json").write_text(json.dumps({**balanced, "valx1": extra, "valx2": extra}))
    choices = {qid: {"valid": ["red", "yes"], "plausible": ["red"]} for qid in balanced}
    # The split's own choices file lacks a question: the next one (challenge_all_choices.json) is used.
    (data / "val_choices.json").write_text(json.dumps({"valn110": choices["valn110"]}))
    (data / "challenge_all_choices.json").write_text(json.dumps(choices))
    with caplog.at_level(logging.INFO, logger="fusion.tasks.gqa"):
        task = _task(data, tmp_path)
        val = task.examples("val")
    # valx1 is added (entailed, not in the balanced file); valn111 is in the split already; valx2 is not entailed.
    assert [e.question_id for e in val][6:] == ["valx1"]
    added = val[6]
    assert (added.label, added.answers, added.image_key, added.answer_type) == (-1, (), "gqa/n11", "verify")
    official = task.official_questions([])
    assert official["valx1"] == GQAQuestion("no", "verify", balanced=False)
    assert official["valn110"].entailed == ("valn110", "valx1", "valn111")
    assert official["valn121"].valid == frozenset({"red", "yes"})
    assert task.reference("val", added).startswith(f"{data / 'val_all_questions.json'}: question 'valx1'")
    text = "\n".join(_messages(caplog))
    assert "split val: 1 entailed questions from" in text and "has no choices for question 'valn111'" in text
    assert f"split val: GQA validity and plausibility from {data / 'challenge_all_choices.json'}" in text
    assert task.majority_accuracy("val") == pytest.approx(1 / 6)  # the added question is not scored
    # task.consistency=false: nothing is added and consistency is left out.
    plain = _task(data, tmp_path, consistency=False)
    assert len(plain.examples("val")) == 6 and plain.official_questions([])["valn110"].entailed is None


def _random_split(root: Path, seed: int) -> tuple[dict, dict, dict[str, str]]:
    """A random val split in the official format (all questions, choices) and random predictions for all."""
    rng = random.Random(seed)
    answers = ["yes", "no", "red", "blue", "cup", "color", "material", "shape"]
    ops = [("select", "cup"), ("exist", "?"), ("query", "name"), ("query", "color"), ("choose name", "a|b"),
           ("filter", "existing"), ("verify color", "red")]
    qids = [f"{i:08d}" for i in range(rng.randint(30, 120))]  # leading zeros: ids stay strings
    questions = {
        qid: {"imageId": "n11", "question": " ".join(["w"] * rng.randint(2, 6)), "answer": rng.choice(answers),
              "isBalanced": rng.random() < 0.6,
              "entailed": rng.sample(qids, rng.randint(0, 4)) + [qid] * rng.randint(0, 1),
              "types": {"structural": rng.choice(STRUCTURAL_TYPES), "semantic": rng.choice(["attr", "obj", "rel"]),
                        "detailed": rng.choice(["color", "twoCommon", "verifyAttr"])},
              "semantic": [op(o, a) for o, a in rng.sample(ops, rng.randint(0, 4))],
              "groups": {"global": rng.choice([None, "g1", "g2", "g3"]), "local": None}}
        for qid in qids
    }
    choices = {q: {"valid": rng.sample(answers, rng.randint(0, 6)), "plausible": rng.sample(answers, rng.randint(0, 4))}
               for q in qids}
    balanced = {q: v for q, v in questions.items() if v["isBalanced"]}
    (root / "val_balanced_questions.json").write_text(json.dumps(balanced))
    (root / "val_all_questions.json").write_text(json.dumps(questions))
    (root / "val_choices.json").write_text(json.dumps(choices))
    train = {f"t{i}": {"imageId": "n1", "question": "q", "answer": a, "types": {"structural": "query"}}
             for i, a in enumerate(answers)}
    (root / "train_balanced_questions.json").write_text(json.dumps(train))
    predictions = {q: v["answer"] if rng.random() < 0.5 else rng.choice(answers) for q, v in questions.items()}
    return questions, choices, predictions


@pytest.mark.parametrize("seed", range(4))
def test_random_splits_score_as_the_hand_computation(tmp_path, seed) -> None:
    """The task and metric on random files equal test_gqa.official_eval (the script's rules, by hand)."""
    root = write_gqa(tmp_path / "gqa")
    questions, choices, predictions = _random_split(root, seed)
    task = _task(root, tmp_path)
    examples = task.examples("val")
    balanced = [q for q, v in questions.items() if v["isBalanced"]]
    # Predicted: the balanced questions and every question they entail, each once.
    ids = [e.question_id for e in examples]
    assert sorted(ids) == sorted(set(balanced) | {e for q in balanced for e in questions[q]["entailed"]})
    metric = task.metric()
    metric.update(ids, torch.tensor([task.answers.index(predictions[q]) for q in ids]))
    ours = {k: float(v) for k, v in metric.compute().items()}
    official = official_eval(questions, choices, [{"questionId": q, "prediction": p} for q, p in predictions.items()])
    expected = {"": official["accuracy"] / 100, "distribution": official["distribution"]}
    for name in ("binary", "open", "consistency", "validity", "plausibility"):
        if official[name] is not None:
            expected[name] = official[name] / 100
    for family, prefix in (("structural", ""), ("semantic", "semantic_"), ("steps", "steps_"), ("words", "words_")):
        expected.update({f"{prefix}{k}": v / 100 for k, v in official[family].items()})
    assert ours == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(2))
def test_random_generated_answers_score_as_the_hand_computation(tmp_path, seed) -> None:
    """Answer strings through the task's text path, a third of them outside the vocabulary (case, spaces,
    words never seen), equal test_gqa.official_eval on the same prediction rows."""
    root = write_gqa(tmp_path / "gqa")
    questions, choices, predictions = _random_split(root, seed)
    rng = random.Random(seed)
    odd = ["Yes", "red ", "purple", "", "a cup", "ñ"]
    predictions = {q: rng.choice(odd) if rng.random() < 1 / 3 else p for q, p in predictions.items()}
    task = _task(root, tmp_path)
    ids = [e.question_id for e in task.examples("val")]
    metric = task.metric()
    for start in range(0, len(ids), 7):
        chunk = ids[start:start + 7]
        task.update_metric_text(metric, [predictions[q] for q in chunk], {"question_ids": chunk})
    rows = task.prediction_rows_text([predictions[q] for q in ids], {"question_ids": ids})
    assert rows == [{"questionId": q, "prediction": predictions[q]} for q in ids]
    ours = {k: float(v) for k, v in metric.compute().items()}
    official = official_eval(questions, choices, rows)
    expected = {"": official["accuracy"] / 100, "distribution": official["distribution"]}
    for name in ("binary", "open", "consistency", "validity", "plausibility"):
        if official[name] is not None:
            expected[name] = official[name] / 100
    for family, prefix in (("structural", ""), ("semantic", "semantic_"), ("steps", "steps_"), ("words", "words_")):
        expected.update({f"{prefix}{k}": v / 100 for k, v in official[family].items()})
    assert ours == pytest.approx(expected, abs=1e-12)
