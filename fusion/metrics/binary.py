"""Metrics of the binary tasks: AUROC with accuracy (Hateful Memes), accuracy with consistency (NLVR).

Hateful Memes, as the challenge scored a submission (``id,proba,label``; the DrivenData challenge and
facebookresearch/mmf, ``mmf/modules/metrics.py`` ``ROC_AUC`` / ``Accuracy``): AUROC is scikit-learn's
``roc_auc_score`` of the gold label against ``proba``, the probability of class 1 (hateful); tied scores
count half (the trapezoid between distinct thresholds), and torchmetrics' exact ``BinaryAUROC``
(``thresholds=None``) computes the same area. Accuracy is the share of memes whose submitted ``label``
equals the gold one; :class:`BinaryAccuracyOrNaN` thresholds as ``proba > 0.5``, which is the label the
project writes (MMF writes the argmax of the two logits: the same decision unless the logits differ by
less than float32 rounding of the softmax).

Each ``compute()`` returns ``{"": headline, "<name>": value}``: the LightningModule logs the headline as
``<stage>/<task.metric_name>`` and the others as ``<stage>/<task.metric_name>_<name>``. Undefined values
(no labelled example, AUROC without both classes) are NaN rather than a number that looks like a result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

NAN = float("nan")


def group_id(key: str) -> int:
    """A signed 64-bit integer standing for the string ``key``: equal keys, equal ids, on every process.

    The consistency groups of NLVR's official scripts are strings; a metric state must be a tensor that
    DDP can gather. A 64-bit BLAKE2b digest keeps the strings' equality (two different keys share an id
    with probability about n^2 / 2^65 for n groups: ~3e-12 for NLVR2's 7k test sentences), where Python's
    ``hash`` would differ between processes.
    """
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class BinaryAUROCOrNaN(BinaryAUROC):
    """torchmetrics' exact ``BinaryAUROC``, but NaN with a warning when it is undefined.

    With only one class among the labelled examples torchmetrics returns 0, which reads as a perfectly
    inverted ranking; the ranking of positives above negatives is simply not defined then.
    """

    def compute(self) -> Tensor:
        # compute() runs on states already gathered from every process, so this sees the whole split.
        target = dim_zero_cat(self.target) if self.target else torch.zeros(0, dtype=torch.long)
        positives, total = int(target.sum()), target.numel()
        if total == 0:
            rank_zero_warn("AUROC is undefined without labelled examples (an unlabelled split?); logging NaN")
            return torch.tensor(NAN, device=self.device)
        if positives in (0, total):
            kind = "positive" if positives else "negative"
            rank_zero_warn(f"AUROC is undefined: all {total} labelled examples are {kind}; logging NaN")
            return torch.tensor(NAN, device=self.device)
        return super().compute()


class BinaryAccuracyOrNaN(BinaryAccuracy):
    """torchmetrics' ``BinaryAccuracy``, but NaN instead of 0 when no example is labelled."""

    def compute(self) -> Tensor:
        if int(self.tp + self.fp + self.tn + self.fn) == 0:
            return torch.tensor(NAN, device=self.device)
        return super().compute()


class HeadlineCollection(MetricCollection):
    """A ``MetricCollection`` whose ``compute()`` names its ``headline`` metric ``""`` (see the module doc)."""

    def __init__(self, metrics: Mapping[str, Metric], headline: str) -> None:
        if headline not in metrics:
            raise ValueError(f"headline {headline!r} is not among the metrics {sorted(metrics)}")
        super().__init__(dict(metrics), compute_groups=False)
        self.headline = headline

    def compute(self) -> dict[str, Tensor]:
        return {("" if k == self.headline else k): v for k, v in super().compute().items()}


def auroc_with_accuracy() -> HeadlineCollection:
    """AUROC (headline) and accuracy at probability 0.5 over the examples labelled 0/1; label -1 is ignored.

    ``update(probs, labels)``: ``probs`` (B,) probability of the positive class, ``labels`` (B,) in {-1, 0, 1}.
    """
    return HeadlineCollection(
        {"auroc": BinaryAUROCOrNaN(ignore_index=-1), "acc": BinaryAccuracyOrNaN(ignore_index=-1)}, headline="auroc"
    )


class AccuracyConsistency(Metric):
    """NLVR's official image metrics: accuracy over examples and consistency over sentences.

    ``update(preds, target, sentences)``: (B,) predicted and true classes and the sentence each example
    belongs to (any integer id; only equality matters). Consistency is the share of sentences all of whose
    examples are predicted correctly. ``compute()``: ``{"": accuracy, "consistency": consistency}``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # One entry per example, concatenated across processes: the sentences of a split are not known when
        # the metric is built (eval.py may point it at any split), so per-sentence counters cannot be sized.
        self.add_state("sentences", default=[], dist_reduce_fx="cat")
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, sentences: Tensor) -> None:
        if not preds.shape == target.shape == sentences.shape:
            raise ValueError(f"shapes differ: preds {preds.shape}, target {target.shape}, sentences {sentences.shape}")
        self.sentences.append(sentences.long())
        # long, not bool: every backend can gather it.
        self.hits.append((preds == target).long())

    def _sync_dist(self, *args: Any, **kwargs: Any) -> None:
        # A process without any example (a split smaller than the world) has empty list states, for which
        # torchmetrics gathers an empty tensor of the metric's float dtype: the processes' tensors would then
        # differ in dtype and the gather fail (gloo aborts). An empty int64 tensor keeps them alike.
        for state in (self.sentences, self.hits):
            if not state:
                state.append(torch.zeros(0, dtype=torch.long, device=self.device))
        super()._sync_dist(*args, **kwargs)

    def compute(self) -> dict[str, Tensor]:
        # A list of batches here, one gathered tensor after a DDP sync.
        empty = isinstance(self.hits, list) and not self.hits
        hits = torch.zeros(0, dtype=torch.long) if empty else dim_zero_cat(self.hits)
        if hits.numel() == 0:
            nan = torch.tensor(NAN, device=self.device)
            return {"": nan, "consistency": nan.clone()}
        sentences = dim_zero_cat(self.sentences)
        _, group = torch.unique(sentences, return_inverse=True)
        wrong = torch.zeros(int(group.max()) + 1, dtype=torch.long, device=hits.device)
        wrong.index_add_(0, group, 1 - hits)
        return {"": hits.float().mean(), "consistency": (wrong == 0).float().mean()}
