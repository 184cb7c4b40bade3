"""GQA's official measures (fusion.metrics.gqa), each on hand-computed cases, the metric under two gloo
processes, and the task's log of the measures a missing file leaves out."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_gqa import _task, official_eval, write_gqa

from fusion.metrics.gqa import (
    GQAMetric,
    GQAQuestion,
    belongs,
    chi_square,
    decode_ids,
    encode_ids,
    official_scores,
    question_record,
    steps_number,
    words_number,
)
from fusion.tasks.formats import DataFormatError
from fusion.tasks.gqa import STRUCTURAL_TYPES


def op(operation: str, argument: str = "") -> dict[str, str]:
    return {"operation": operation, "argument": argument}


def test_words_and_steps_numbers() -> None:
    assert words_number("Is the  cup\tred?") == 4
    # "exist", "query: name" and "choose name" are substrings of "<operation>: <argument>" that do not count.
    program = [op("select", "cup"), op("relate", "on,s"), op("query", "name"), op("exist", "?"),
               op("choose name", "cup|mug"), op("query", "color"), op("filter", "existing")]
    assert steps_number(program) == 3  # select, relate, query color ("filter: existing" contains "exist")
    assert steps_number([]) == 0


def test_belongs_and_the_common_rule() -> None:
    assert belongs("red", ["red", "blue"], "color") and not belongs("green", ["red", "blue"], "color")
    # A question whose types.detailed contains "Common" is valid with color, material or shape only.
    assert belongs("material", ["red"], "twoCommon") and not belongs("red", ["red"], "twoCommon")
    assert belongs("red", ["red"], "common")  # the test is case-sensitive


def test_chi_square_on_tiny_groups() -> None:
    gold = {"g1": {"yes": 2, "no": 1}, "g2": {"red": 1}}
    predicted = {"g1": {"yes": 1, "no": 1, "red": 1}, "g2": {"blue": 1}}
    # g1: (1-2)^2/2 + (1-1)^2/1 = 0.5 over 3 questions ("red" is no gold answer of g1: ignored);
    # g2: (0-1)^2/1 = 1 over 1 question. Weighted: (0.5 * 3 + 1 * 1) / 4.
    assert chi_square(gold, predicted) == pytest.approx(2.5 / 4)
    assert chi_square({"g": {"a": 2}}, {"g": {"a": 2}}) == 0.0
    with pytest.raises(ZeroDivisionError):
        chi_square({}, {})


def _questions() -> dict[str, GQAQuestion]:
    """Four balanced questions (two open, two binary), one unbalanced, two entailed-only ones."""
    colors = frozenset({"red", "blue", "green"})
    return {
        "q1": GQAQuestion("red", "query", "attr", "color", 5, 2, "color", True, ("q1", "e1", "e2"), colors,
                          frozenset({"red", "blue"})),
        "q2": GQAQuestion("yes", "verify", "attr", "existAttr", 4, 2, "yesno", True, ("e1",),
                          frozenset({"yes", "no"}), frozenset({"yes", "no"})),
        "q3": GQAQuestion("blue", "query", "obj", "color", 5, 3, "color", True, ("e2",), colors, colors),
        "q4": GQAQuestion("no", "logical", "rel", "twoCommon", 6, 3, None, True, (), frozenset({"yes", "no"}),
                          frozenset({"yes", "no"})),
        "u1": GQAQuestion("yes", "verify", "attr", "", 3, 1, "yesno", False, ("e1",)),
        "e1": GQAQuestion("no", "verify", balanced=False),
        "e2": GQAQuestion("green", "query", balanced=False),
    }


PREDICTIONS = {"q1": "red", "q2": "yes", "q3": "red", "q4": "material", "u1": "no", "e1": "no", "e2": "red"}


def test_official_scores_by_hand() -> None:
    scores = official_scores(_questions(), PREDICTIONS)
    assert scores.skipped == {}
    # q1, q2 right; q3, q4 wrong; u1 is not balanced and does not count.
    assert scores.accuracy == 0.5
    assert scores.open == 0.5 and scores.binary == 0.5  # open: q1 right, q3 wrong; binary: q2 right, q4 wrong
    assert scores.per_structural == {"query": (0.5, 2), "verify": (1.0, 1), "logical": (0.0, 1)}
    assert scores.per_semantic == {"attr": (1.0, 2), "obj": (0.0, 1), "rel": (0.0, 1)}
    assert scores.per_steps == {2: (1.0, 2), 3: (0.0, 2)}
    assert scores.per_words == {5: (0.5, 2), 4: (1.0, 1), 6: (0.0, 1)}
    # Validity: q1 red valid, q2 yes valid, q3 red valid, q4 "material" valid by the Common rule -> 4/4.
    # Plausibility: q1 red in {red, blue}, q2 yes, q3 red, q4 material (Common) -> 4/4; see the next test too.
    assert scores.validity == 1.0 and scores.plausibility == 1.0
    # Consistency: the correct balanced questions with entailed questions other than themselves: q1 (e1 right,
    # e2 wrong: 0.5) and q2 (e1 right: 1.0); q3 is wrong, q4 has none -> (0.5 + 1) / 2.
    assert scores.consistency == pytest.approx(0.75)
    # Distribution: group color gold {red: 1, blue: 1}, predicted {red: 2}: (2-1)^2/1 + (0-1)^2/1 = 2 over 2;
    # yesno gold {yes: 1} predicted {yes: 1}: 0 over 1; q4 has no group. (2 * 2 + 0 * 1) / 3 / 100.
    assert scores.distribution == pytest.approx(4 / 3 / 100)
    metrics = scores.as_metrics()
    assert metrics[""] == 0.5 and metrics["consistency"] == pytest.approx(0.75)
    assert metrics["query"] == 0.5 and metrics["semantic_attr"] == 1.0 and metrics["steps_3"] == 0.0
    assert metrics["words_6"] == 0.0 and "accuracy" not in metrics


def test_invalid_and_implausible_answers() -> None:
    predictions = {**PREDICTIONS, "q1": "green", "q2": "maybe", "q4": "yes"}
    scores = official_scores(_questions(), predictions)
    # q1 green: valid, not plausible; q2 maybe: neither; q3 red: both; q4 "yes" is not color/material/shape.
    assert scores.validity == pytest.approx(2 / 4) and scores.plausibility == pytest.approx(1 / 4)


def test_a_measure_without_its_data_is_left_out_with_the_reason() -> None:
    questions = _questions()
    questions["q3"] = GQAQuestion("blue", "query", None, "color", None, None, None, True, None)
    scores = official_scores(questions, PREDICTIONS)
    assert scores.validity is None and scores.plausibility is None and scores.consistency is None
    assert scores.per_semantic == {} and scores.per_steps == {} and scores.per_words == {}
    assert "'q3'" in scores.skipped["validity"] and "entailed questions of question 'q3'" in scores.skipped[
        "consistency"]
    assert set(scores.skipped) == {"validity", "plausibility", "consistency", "accuracy per semantic type",
                                   "accuracy per steps number", "accuracy per words number"}
    assert scores.accuracy == 0.5 and scores.distribution is not None
    metrics = scores.as_metrics()
    assert not any(k in metrics for k in ("validity", "plausibility", "consistency", "semantic_attr", "steps_2"))


def test_nothing_to_average_is_left_out_not_zero() -> None:
    only_open = {"q": GQAQuestion("red", "query", entailed=())}
    scores = official_scores(only_open, {"q": "red"})
    assert scores.accuracy == 1.0 and scores.open == 1.0 and scores.binary is None
    assert {"binary", "consistency", "distribution"} <= set(scores.skipped)
    empty = official_scores(only_open, {"other": "red"})
    assert empty.accuracy is None and math.isnan(empty.as_metrics()[""])
    # An entailed question without a prediction: the script would stop; here consistency is left out.
    scores = official_scores({"q": GQAQuestion("red", "query", entailed=("e",)), "e": GQAQuestion("no")}, {"q": "red"})
    assert scores.consistency is None and "no prediction for question 'e'" in scores.skipped["consistency"]


def test_question_record_reads_the_official_fields() -> None:
    entry = {
        "question": "Is the cup on the left red?", "answer": "no", "isBalanced": False,
        "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
        "semantic": [op("select", "cup"), op("filter hposition", "left"), op("verify color", "red")],
        "groups": {"global": None, "local": "13-cup_red"}, "entailed": ["a", "b"],
    }
    record = question_record(entry, "f: question 'x'", "verify", "no")
    assert record == GQAQuestion("no", "verify", "attr", "verifyAttr", 7, 3, None, False, ("a", "b"))
    bare = question_record({"question": "Red?"}, "w", "verify", "yes")
    assert (bare.semantic, bare.steps, bare.group, bare.entailed, bare.balanced) == (None, None, None, (), True)
    with pytest.raises(DataFormatError, match=r"f: question 'x': 'semantic'\[0\] is 'select'"):
        question_record({**entry, "semantic": ["select"]}, "f: question 'x'", "verify", "no")
    with pytest.raises(DataFormatError, match=r"key 'isBalanced' is 'yes'"):
        question_record({**entry, "isBalanced": "yes"}, "w", "verify", "no")


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


def _ddp_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = GQAMetric(ANSWERS, _lookup)
        # Uneven shares, one rank without any update at all in the second metric.
        _update(metric, ["q1", "q2", "q3", "q4", "u1"] if rank == 0 else ["e1", "e2"])
        lonely = GQAMetric(ANSWERS, _lookup)
        if rank == 1:
            _update(lonely, list(PREDICTIONS))
        out = [{k: float(v) for k, v in m.compute().items()} for m in (metric, lonely)]
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
    for out in queue.get(timeout=60):
        assert out == pytest.approx(expected)


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
