"""GQA's official measures (fusion.metrics.gqa_official), each on hand-computed cases."""

from __future__ import annotations

import math

import pytest

from fusion.io import DataFormatError
from fusion.metrics.gqa_official import (
    GQAQuestion,
    belongs,
    chi_square,
    official_scores,
    question_record,
    steps_number,
    words_number,
)


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
