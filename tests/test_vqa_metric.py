"""The official VQA accuracy: answer normalisation and leave-one-out scoring, checked by hand."""

import pytest
import torch

from fusion.tasks.vqa_metric import (
    VQAAccuracy,
    leave_one_out_accuracy,
    normalize_answer,
    official_references,
    process_punctuation,
    soft_scores,
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


def test_punctuation_only_for_references():
    assert process_punctuation("Two Dogs!") == "Two Dogs "
    # Human answers get punctuation processing only, and only when they differ.
    assert official_references(["yes."] * 3) == ("yes.",) * 3
    assert official_references(["yes.", "yes"]) == ("yes", "yes")


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_accuracy_with_ten_annotators(matches, expected):
    # E.g. 2 matches: 2 of the 10 subsets keep 1 match (1/3), 8 keep 2 (2/3): (2/3 + 16/3) / 10 = 0.6.
    assert leave_one_out_accuracy(matches, 10) == pytest.approx(expected)


def test_leave_one_out_rejects_impossible_counts():
    with pytest.raises(ValueError, match="at least one"):
        leave_one_out_accuracy(0, 0)
    with pytest.raises(ValueError, match="matches"):
        leave_one_out_accuracy(4, 3)


def test_vqa_accuracy_normalises_the_prediction():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("Two.", answers) == pytest.approx(0.9)
    assert vqa_accuracy("three", answers) == pytest.approx(1.0)
    assert vqa_accuracy("four", answers) == 0.0
    assert vqa_accuracy("a dog", ["dog", "dog", "cat"] + ["bird"] * 7) == pytest.approx(0.6)
    assert vqa_accuracy("dont know", ["don't know"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    # Differing human answers get their punctuation processed: "hot-dog" counts as "hot dog" ...
    assert vqa_accuracy("hot dog", ["hot-dog", "hot dog", "cat", "cat"]) == pytest.approx((2 * 1 / 3 + 2 * 2 / 3) / 4)
    # ... but, as in the official script, are not stripped afterwards: "dog!" becomes "dog " (no match).
    assert vqa_accuracy("dog", ["dog!", "dog", "cat", "cat"]) == pytest.approx((1 * 0 + 3 * 1 / 3) / 4)


def test_official_quirk_human_number_words_are_not_mapped():
    # The official script maps "two" -> "2" in predictions only (released answers are normalised already).
    assert vqa_accuracy("two", ["two"] * 10) == 0.0


def test_soft_scores_are_the_leave_one_out_accuracy_of_each_answer():
    scores = soft_scores(["red"] * 3 + ["blue"] * 6 + ["green"])
    assert scores == pytest.approx({"red": 0.9, "blue": 1.0, "green": 0.3})


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
