"""The binary tasks' metrics on their own: values by hand, undefined cases, and merging as DDP does."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusion.metrics.binary import AccuracyConsistency, HeadlineCollection, auroc_with_accuracy, group_id


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


def _consistency_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = AccuracyConsistency()
        if rank == 0:  # rank 1 gets no example (a split smaller than the number of processes)
            sentences = torch.tensor([group_id("s1"), group_id("s1"), group_id("s2")])
            metric.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), sentences)
        both = AccuracyConsistency()  # every process has examples: s1 spans the two processes
        both.update(torch.tensor([1, rank]), torch.tensor([1, 1]), torch.tensor([group_id("s1"), group_id(f"r{rank}")]))
        out = [{k: float(v) for k, v in m.compute().items()} for m in (metric, both)]
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def test_consistency_gathers_across_processes_even_one_without_examples() -> None:
    # torchmetrics stands in an empty tensor of the metric's dtype for a process's empty list state: the
    # gathered states must still hold every example, and integers (the 64-bit sentence ids) exactly.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    mp.start_processes(_consistency_worker, args=(port, queue), nprocs=2, start_method="spawn")
    alone, both = queue.get(timeout=60)
    # accuracy 2/3; sentence s1 has a wrong example, s2 none: consistency 1/2.
    assert alone == pytest.approx({"": 2 / 3, "consistency": 0.5})
    # hits 1, 0 (rank 0) and 1, 1 (rank 1): accuracy 3/4; s1 (1, 1) and r1 (1) right, r0 (0) wrong: 2/3.
    assert both == pytest.approx({"": 3 / 4, "consistency": 2 / 3})
