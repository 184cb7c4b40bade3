"""GQA's official measures over an evaluation: :class:`GQAMetric` collects every question's prediction
(every process's, under DDP) and scores them at the end with :func:`fusion.metrics.gqa_official.official_scores`
(the rules, as GQA's evaluation script applies them, are documented there).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from fusion.metrics.gqa_official import GQAQuestion, official_scores

log = logging.getLogger(__name__)


def encode_ids(
    question_ids: Sequence[str], device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Strings (question ids, predicted answers) as tensors a process group can gather: the UTF-8 bytes of all of
    them, and each one's length in bytes (whole numbers, exact in float32)."""
    raw = [q.encode("utf-8") for q in question_ids]
    codes = torch.tensor([b for r in raw for b in r], dtype=dtype, device=device)
    return codes, torch.tensor([len(r) for r in raw], dtype=dtype, device=device)


def decode_ids(codes: Tensor, lengths: Tensor) -> list[str]:
    """The inverse of :func:`encode_ids`."""
    data = bytes(codes.long().tolist())
    ends = torch.cumsum(lengths.long(), 0).tolist()
    starts = [0, *ends][: len(ends)]
    return [data[a:b].decode("utf-8") for a, b in zip(starts, ends, strict=True)]


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A ``cat`` state as one tensor: a list before syncing (empty when nothing was added), a tensor after."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else torch.zeros(0)


class GQAMetric(Metric):
    """GQA's official measures (:func:`official_scores`) over every question an evaluation predicted.

    ``update(question_ids, preds)``: the batch's question ids (str) and predicted answer indices into ``answers``
    (a classifier's argmax). ``update_text(question_ids, texts)``: the same with the predicted answer strings
    themselves (a generating head's answers, inside the vocabulary or not); both may feed one metric. Every
    prediction is kept as its string, which is what the official script compares (accuracy, validity,
    plausibility, consistency and distribution alike), so an index and its vocabulary entry as text score the
    same. ``compute()``: :meth:`GQAScores.as_metrics` of the predictions (all processes', when distributed),
    scored against ``questions(question_ids)``, the task's questions that know those ids. Each reason a measure
    is left out is logged once per metric.
    """

    full_state_update = False

    def __init__(
        self,
        answers: Sequence[str],
        questions: Callable[[Collection[str]], Mapping[str, GQAQuestion]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.answers = list(answers)
        self.questions = questions
        # One entry per question, concatenated across processes at compute(): the questions of a split are not
        # known when the metric is built, and only the whole split gives consistency and the distribution.
        # Ids and predicted answers as UTF-8 bytes and lengths (encode_ids), whole numbers stored in the metric's
        # float dtype: a process without any update sends torchmetrics' empty stand-in in that dtype, and
        # all_gather needs the same dtype on every process (an int32 share beside a float32 one would arrive as
        # garbage). Bytes and lengths below 2**24 are exact.
        self.add_state("id_codes", default=[], dist_reduce_fx="cat")
        self.add_state("id_lengths", default=[], dist_reduce_fx="cat")
        self.add_state("pred_codes", default=[], dist_reduce_fx="cat")
        self.add_state("pred_lengths", default=[], dist_reduce_fx="cat")
        self._logged: set[str] = set()

    def update(self, question_ids: Sequence[str], preds: Tensor | Sequence[str]) -> None:
        """Add the batch's predictions: indices into ``answers`` (a tensor (B,)) or the answer strings themselves
        (:meth:`update_text`)."""
        if isinstance(preds, Tensor):
            if len(question_ids) != preds.shape[0]:
                raise ValueError(f"{len(question_ids)} question ids for {preds.shape[0]} predictions")
            indices = preds.long().tolist()
            bad = next((i for i in indices if not 0 <= i < len(self.answers)), None)
            if bad is not None:
                raise ValueError(f"predicted answer index {bad} is not an index into the {len(self.answers)} answers")
            texts = [self.answers[i] for i in indices]
        else:
            texts = list(preds)
            if len(question_ids) != len(texts):
                raise ValueError(f"{len(question_ids)} question ids for {len(texts)} predictions")
            bad = next((t for t in texts if not isinstance(t, str)), None)
            if bad is not None:
                raise TypeError(f"predicted answers must be strings, got {type(bad).__name__} {bad!r}")
        if not question_ids:
            return
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"GQAMetric keeps ids and answers as whole numbers in its dtype, and {self.dtype} "
                             "does not hold them exactly: use set_dtype(torch.float32)")
        codes, lengths = encode_ids(question_ids, self.device, self.dtype)
        self.id_codes.append(codes)
        self.id_lengths.append(lengths)
        codes, lengths = encode_ids(texts, self.device, self.dtype)
        self.pred_codes.append(codes)
        self.pred_lengths.append(lengths)

    def update_text(self, question_ids: Sequence[str], texts: Sequence[str]) -> None:
        """Add the batch's predictions as answer strings, compared as they are (the official script does not
        normalise predictions). Goes through :meth:`update`, so that torchmetrics counts the update and drops a
        cached ``compute()``."""
        if isinstance(texts, (str, Tensor)):
            raise TypeError(f"texts must be a sequence of answer strings, got {type(texts).__name__}")
        self.update(question_ids, list(texts))

    def predictions(self) -> dict[str, str]:
        """``{question id: predicted answer}`` of everything added (and gathered) so far."""
        qids = decode_ids(_cat(self.id_codes).cpu(), _cat(self.id_lengths).cpu())
        preds = decode_ids(_cat(self.pred_codes).cpu(), _cat(self.pred_lengths).cpu())
        return dict(zip(qids, preds, strict=True))

    def compute(self) -> dict[str, Tensor]:
        predictions = self.predictions()
        scores = official_scores(self.questions(predictions.keys()), predictions)
        measures: dict[str, list[str]] = defaultdict(list)
        for measure, reason in scores.skipped.items():
            measures[reason].append(measure)
        for reason, names in measures.items():
            message = f"GQA {' and '.join(names)} not computed: {reason}"
            if message not in self._logged:
                self._logged.add(message)
                log.info(message)
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.as_metrics().items()}
