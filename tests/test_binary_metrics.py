"""The binary tasks' metrics on their own: values by hand, undefined cases, and merging as DDP does."""

import math

import pytest
import torch

from fusion.tasks.binary_metrics import AccuracyConsistency, HeadlineCollection, auroc_with_accuracy, group_id


def test_auroc_of_processes_merged_equals_auroc_of_all():
    # merge_state applies each state's dist_reduce_fx, as the sync across DDP processes does.
    whole, first, second = auroc_with_accuracy(), auroc_with_accuracy(), auroc_with_accuracy()
    probs, labels = torch.tensor([0.9, 0.2, 0.1, 0.8, 0.4]), torch.tensor([1, 0, 1, 0, 1])
    whole.update(probs, labels)
    first.update(probs[:2], labels[:2])
    second.update(probs[2:], labels[2:])
    for name in first:
        first[name].merge_state(second[name])
    # Positives 0.9, 0.1, 0.4 vs negatives 0.2, 0.8: 0.9 beats both, 0.4 beats 0.2, 0.1 none -> 3 of 6.
    expected = {"": 0.5, "acc": 2 / 5}
    for metric in (whole, first):
        assert {k: pytest.approx(v.item()) for k, v in metric.compute().items()} == expected


def test_consistency_of_processes_merged_equals_consistency_of_all():
    first, second = AccuracyConsistency(), AccuracyConsistency()
    # Sentence 3 is split across the two processes and wrong in the second: inconsistent overall.
    first.update(torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([3, 4]))
    second.update(torch.tensor([0, 1]), torch.tensor([1, 1]), torch.tensor([3, 4]))
    first.merge_state(second)
    out = first.compute()
    assert out[""].item() == pytest.approx(0.75) and out["consistency"].item() == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_consistency_without_examples_is_nan_and_shapes_must_agree():
    metric = AccuracyConsistency()
    assert all(math.isnan(v.item()) for v in metric.compute().values())
    with pytest.raises(ValueError, match="shapes differ"):
        metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), torch.tensor([7]))


def test_headline_must_be_one_of_the_metrics():
    with pytest.raises(ValueError, match=r"headline 'auc' is not among the metrics \['acc'\]"):
        HeadlineCollection({"acc": AccuracyConsistency()}, headline="auc")


def test_group_ids_keep_the_equality_of_the_official_group_strings():
    keys = ["dev-850--0", "dev-850--1", "test1-850--0", "dev-850--00", "7", "07", ""]
    ids = [group_id(k) for k in keys]
    assert len(set(ids)) == len(keys)  # strings an integer packing would merge stay apart
    assert group_id("dev-850--0") == ids[0]  # a digest, not Python's per-process salted hash()
    assert torch.tensor(ids).dtype == torch.long  # signed 64 bits: a metric state DDP can gather
