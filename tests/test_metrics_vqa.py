"""The official VQA accuracy: the rules of the current vqaEval.py (module docstring), checked by hand."""

import pytest
import torch

from fusion.metrics.vqa import (
    References,
    VQAAccuracy,
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),
        ("Two", "2"),
        ("ten", "10"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("don't", "don't"),  # the apostrophe is not in the official punctuation list
        ("isnt it", "isn't it"),
        ("yes!", "yes"),
        ("yes.", "yes"),
        ("hot-dog", "hot dog"),  # a mark touching no space becomes a space
        ("hot - dog", "hot dog"),  # ... but is deleted when it touches one
        ("1,000", "1000"),  # a digit,digit group deletes every mark
        ("3.5", "3.5"),  # a period before a digit stays
        ("  red\tand\nwhite ", "red and white"),
        ("t-shirt", "t shirt"),
        ("(left)", "left"),
    ],
)
def test_normalize_answer_like_the_official_script(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_processing_keeps_the_official_spacing():
    # "!" touches no space in "Two Dogs!", so it becomes a space; the digit/article step then splits on spaces.
    assert process_punctuation("Two Dogs!") == "Two Dogs "
    assert process_digit_article(process_punctuation("Two Dogs!")) == "2 dogs"


def test_references_are_processed_only_when_the_annotators_disagree():
    # Rule 2: ten identical answers stay as they are (after rule 1's strip) ...
    same = References.from_entries(["Two."] * 10)
    assert same.answers == ("Two.",) * 10 and not same.normalized
    # ... while differing answers all get punctuation + digit/article processing, and so does the prediction.
    mixed = References.from_entries(["Two.", "2", "two dogs"] + ["3"] * 7)
    assert mixed.answers == ("2", "2", "2 dogs") + ("3",) * 7 and mixed.normalized
    assert mixed.form("TWO!") == "2" and same.form(" TWO! ") == "TWO!"
@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy_with_ten_annotators(matches, expected):
    # E.g. 2 matches: 2 of the 10 subsets keep 1 match (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    assert leave_one_out_accuracy(matches, 10) == pytest.approx(expected)


def test_leave_one_out_rejects_impossible_counts():
    with pytest.raises(ValueError, match="at least one"):
        leave_one_out_accuracy(0, 0)
    with pytest.raises(ValueError, match="matches"):
        leave_one_out_accuracy(4, 3)


def _entries(answers: list[str], ids: bool = True) -> list[dict]:
    """Answer entries as in the official annotation files (each with its own answer_id unless ``ids=False``)."""
    return [
        {"answer": a, "answer_confidence": "yes", **({"answer_id": i + 1} if ids else {})}
        for i, a in enumerate(answers)
    ]


def test_mixed_answers_process_both_sides():
    # Humans disagree ("2" vs "3"), so both sides are processed: "two"/"Two." -> "2", which 3 of 10 gave:
    # 3 entries see 2 matches among the others (2/3), 7 see 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", _entries(answers)) == pytest.approx(0.9)
    assert vqa_accuracy("three", answers) == pytest.approx(1.0)  # 7 matches: every subset keeps >= 6
    assert vqa_accuracy("four", answers) == 0.0
    # Human answers get the digit/article step too: "Two" and "two" count as "2" (5 + 2 + 1 = 8 matches -> 1).
    assert vqa_accuracy("2", ["2"] * 5 + ["Two", "two", "two."] + ["3"] * 2) == pytest.approx(1.0)
    # "a dog" -> "dog"; the humans' "the dog" -> "dog" too: 2 matches of 10 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("a dog", ["dog", "the dog"] + ["bird"] * 8) == pytest.approx(0.6)


def test_all_identical_answers_process_neither_side():
    # Rule 2: ten "2" and the prediction "Two": no processing, "Two" != "2" -> 0 (the example).
    assert vqa_accuracy("Two", ["2"] * 10) == 0.0
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    # ... and the other way round: ten raw "two" are not mapped to "2"; only the exact string scores.
    assert vqa_accuracy("two", ["two"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0
    # Case matters when nothing is processed: "yes" against ten "Yes" scores 0.
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0


def test_newlines_and_tabs_are_cleaned_on_both_sides_first():
    # Rule 1 runs before the identity test: " yes\n" and "yes" are identical after cleaning, so nothing else
    # is processed, and a prediction "\tyes " cleans to "yes": 10 matches -> 1.
    assert vqa_accuracy("\tyes ", ["yes\n"] * 5 + ["yes"] * 5) == 1.0
    # A newline inside becomes a space: "red\nand white" -> "red and white" (mixed answers: processed too).
    assert vqa_accuracy("red\nand white", ["red and white"] * 2 + ["red"] * 8) == pytest.approx(0.6)


def test_numbers_with_commas_and_periods():
    # A digit,digit group deletes every punctuation mark: "1,000" -> "1000" on both sides when they disagree.
    assert vqa_accuracy("1000", ["1,000"] * 4 + ["1000"] * 2 + ["many"] * 4) == pytest.approx(1.0)
    # With all ten "1,000" nothing is processed: "1000" does not match.
    assert vqa_accuracy("1000", ["1,000"] * 10) == 0.0
    # A period before a digit stays ("3.5"), one after it goes ("3." -> "3"): 3 matches -> 0.9.
    assert vqa_accuracy("3.", ["3"] * 3 + ["3.5"] * 7) == pytest.approx(0.9)


def test_contractions_are_restored_on_both_sides():
    # "dont" -> "don't" (the apostrophe is not in the punctuation list); the humans' "dont" too when mixed:
    # 2 "dont" + 2 "don't" = 4 matches -> 1.
    assert vqa_accuracy("dont know", ["dont know"] * 2 + ["don't know"] * 2 + ["no"] * 6) == pytest.approx(1.0)
    # ... but not when all ten say "dont know": the prediction "don't know" stays as it is -> 0.
    assert vqa_accuracy("don't know", ["dont know"] * 10) == 0.0


def test_punctuation_marks_touching_a_space_are_deleted_not_spaced():
    # "hot-dog" -> "hot dog" (no space next to "-"); "dog!" -> "dog " is then split and rejoined -> "dog".
    assert vqa_accuracy("hot dog", ["hot-dog", "hot dog", "cat", "cat"]) == pytest.approx((2 * 1 / 3 + 2 * 2 / 3) / 4)
    assert vqa_accuracy("dog", ["dog!", "dog", "cat", "cat"]) == pytest.approx((2 * 1 / 3 + 2 * 2 / 3) / 4)


def test_any_prediction_string_is_scored_not_only_vocabulary_entries():
    # A prediction no vocabulary holds ("The Two.") is processed like any other: -> "2" (3 matches -> 0.9).
    assert vqa_accuracy("The Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("", ["2"] * 3 + ["3"] * 7) == 0.0


def test_entries_without_answer_ids_drop_their_twins_as_the_evaluator_does():
    # Rule 3: the evaluator's "other answers" are the entries != this one as whole dicts. Without answer_id,
    # the 4 "yes" entries are equal dicts: leaving one out drops all four (0 matches -> 0), leaving out a "no"
    # keeps 4 matches (-> 1): (4 * 0 + 6 * 1) / 10 = 0.6, not the 1.0 of plain leave-one-out.
    entries = _entries(["yes"] * 4 + ["no"] * 6, ids=False)
    assert vqa_accuracy("yes", entries) == pytest.approx(0.6)
    assert vqa_accuracy("yes", _entries(["yes"] * 4 + ["no"] * 6)) == pytest.approx(1.0)
    # Entries equal in text but not in confidence are different dicts: plain leave-one-out again.
    entries[0]["answer_confidence"] = "maybe"
    # The "maybe" entry sees the 3 others (1); the 3 twins drop each other (matches 4 - 3 = 1 -> 1/3);
    # the "no"s see 4 (1): (1 + 3 * 1/3 + 6) / 10 = 0.8.
    assert vqa_accuracy("yes", entries) == pytest.approx(0.8)
    # Processing makes "Yes" and "yes" equal texts, so those entries become twins after it (mixed answers):
    twins = _entries(["Yes", "yes", "no"], ids=False)  # both -> "yes": each drops the other: 0 matches -> 0
    assert vqa_accuracy("yes", twins) == pytest.approx((0 + 0 + min(1, 2 / 3)) / 3)


def test_metric_overall_and_per_answer_type():
    metric = VQAAccuracy(["yes/no", "number", "other"])
    metric.update(torch.tensor([1.0, 0.0, 0.6]), torch.tensor([0, 0, 1]))
    metric.update(torch.tensor([0.3], dtype=torch.float64), torch.tensor([1]))
    out = metric.compute()
    assert out[""].item() == pytest.approx(1.9 / 4)
    assert out["yes_no"].item() == pytest.approx(0.5)
    assert out["number"].item() == pytest.approx(0.45)
    assert "other" not in out  # no example of that type: not reported as 0
    metric.reset()
    metric.update(torch.tensor([1.0]), torch.tensor([2]))
    assert metric.compute()[""].item() == 1.0


def test_metric_states_sum_across_processes():
    # DDP reduces each state with sum: the merged metric equals one metric that saw everything.
    a, b, both = (VQAAccuracy(["x", "y"]) for _ in range(3))
    a.update(torch.tensor([1.0, 0.3]), torch.tensor([0, 1]))
    b.update(torch.tensor([0.6]), torch.tensor([1]))
    both.update(torch.tensor([1.0, 0.3, 0.6]), torch.tensor([0, 1, 1]))
    assert a._reductions["score"] is b._reductions["count"]  # torchmetrics' sum reduction
    a.merge_state(b)
    assert {k: v.item() for k, v in a.compute().items()} == pytest.approx(
        {k: v.item() for k, v in both.compute().items()}
    )
