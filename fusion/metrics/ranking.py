"""Retrieval evaluation: ranks with explicit tie handling, two-stage re-ranking, and Recall@K.

Conventions: a query ranks ``C`` candidates by a score matrix ``(Q, C)`` (higher = better) and has one or
more correct candidates, ``positives`` ``(Q, C)`` bool (image -> text: the image's five captions). The
rank of a query is the 1-based position of its first correct candidate when **every tie is broken
against the model**: all wrong candidates scoring at least as high as the best correct one come first.
A constant scorer therefore gets rank ``1 + #wrong``, never R@1 = 1. Recall@K is the share of queries
with rank <= K; image -> text hits if any of the image's captions is within the top K.

The standard Karpathy-split protocol (VSE++, fartashf/vsepp ``evaluation.py`` ``i2t`` / ``t2i``; ALBEF and
ViLT's ``itm_eval`` follow it): text -> image, each caption ranks every image of the split and hits at K
when its own image is among the first K, R@K = hits / captions; image -> text, each image ranks every
caption and hits at K when the best-placed of its captions (five per image) is among the first K, R@K =
hits / images; rsum = the six recalls added. Those scripts report percentages (rsum <= 600), order with
``numpy.argsort`` (ties in whatever order the sort leaves them) and count ranks from 0 (hit: rank < K);
here recalls are fractions (rsum <= 6), ranks count from 1 (hit: rank <= K) and ties go against the model,
which only differs where scores tie exactly.

Re-ranking: the cheap first stage scores all pairs; for each query its top-``k`` candidates by the first
stage are re-scored by an expensive scorer (the fusion model's image-text matching score). The final
order is those ``k`` candidates by the expensive score, then every other candidate by the first stage.
With ``k >= C`` this is exactly exhaustive scoring by the expensive scorer. The ranks and the top lists of
the prediction file come from that one order (:func:`two_stage_order`), so R@K read off the file is R@K
as reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

DIRECTIONS: tuple[str, ...] = ("t2i", "i2t")

# Scores the pairs (text t_idx[p], image i_idx[p]) -> (P,) scores; pairs come sorted (text, image).
PairScorer = Callable[[Tensor, Tensor], Tensor]


def pessimistic_rank(scores: Tensor, positives: Tensor, members: Tensor | None = None) -> Tensor:
    """Rank of each query's best-scored correct candidate, ties counted against the model.

    ``scores``, ``positives`` and ``members`` are ``(Q, C)``; only ``members`` (default: all) take part.
    Returns ``(Q,)`` long: ``1 + #(wrong members scoring >= the best correct member)``, or 0 for a query
    with no correct member.
    """
    members = torch.ones_like(positives, dtype=torch.bool) if members is None else members.bool()
    correct = positives.bool() & members
    wrong = ~positives.bool() & members
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)
    ahead = (wrong & (scores >= best)).sum(dim=1)
    return torch.where(correct.any(dim=1), 1 + ahead, torch.zeros_like(ahead))


def top_candidates(first: Tensor, k: int) -> Tensor:
    """``(Q, C)`` first-stage scores -> ``(Q, min(k, C))`` candidate indices, best first."""
    return first.topk(min(int(k), first.shape[1]), dim=1).indices


def two_stage_order(first: Tensor, rescored: Tensor, members: Tensor, positives: Tensor) -> Tensor:
    """The re-ranked order ``(Q, C)`` of every query's candidates, best first (see the module docstring).

    ``first`` ``(Q, C)`` first-stage scores; ``rescored`` ``(Q, C)`` expensive scores, read at ``members``
    only (the re-scored candidates, ``(Q, C)`` bool); ``positives`` ``(Q, C)`` bool. Members come first (even
    one scoring -inf), by the expensive score, then the others by the first-stage score; among equal scores
    wrong candidates precede correct ones (ties against the model), then lower candidate indices.
    """
    score = torch.where(members, rescored, first)
    # Stable sorts from the least significant key up: index (the identity), correctness, score, membership.
    order = torch.sort(positives.long(), dim=1, stable=True).indices
    order = order.gather(1, torch.sort(score.gather(1, order), dim=1, descending=True, stable=True).indices)
    key = members.long().gather(1, order)
    return order.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)


def rank_in_order(order: Tensor, positives: Tensor) -> Tensor:
    """``(Q,)`` 1-based position in ``order`` ``(Q, C)`` of each query's first correct candidate; 0 if none."""
    correct = positives.bool().gather(1, order)
    first = correct.long().argmax(dim=1)  # the first maximum: the first correct position
    return torch.where(correct.any(dim=1), first + 1, torch.zeros_like(first))


@dataclass
class Reranked:
    """Both directions of a re-ranked evaluation: ranks ``(T,)`` / ``(I,)`` and top lists of indices."""

    t2i_ranks: Tensor
    i2t_ranks: Tensor
    t2i_top: Tensor
    i2t_top: Tensor
    pairs_scored: int


def rerank(first: Tensor, positives: Tensor, k: int, scorer: PairScorer, top: int = 10) -> Reranked:
    """Re-rank the top ``k`` of the first stage in both directions with ``scorer``.

    ``first`` ``(T, I)`` first-stage text x image scores; ``positives`` ``(T, I)`` bool, True where the
    caption describes the image. Each (text, image) pair among either direction's candidates is scored
    once, in sorted (text, image) order, so with ``k >= max(T, I)`` the scorer sees exactly the calls of
    :func:`exhaustive_scores`.
    """
    if k < 1:
        raise ValueError(f"rerank k must be >= 1, got {k}")
    T, I = first.shape
    rows = torch.arange(T, device=first.device)
    members_t2i = torch.zeros(T, I, dtype=torch.bool, device=first.device)
    members_t2i[rows[:, None], top_candidates(first, k)] = True
    members_i2t = torch.zeros(I, T, dtype=torch.bool, device=first.device)
    members_i2t[torch.arange(I, device=first.device)[:, None], top_candidates(first.T, k)] = True
    scored = members_t2i | members_i2t.T
    t_idx, i_idx = scored.nonzero(as_tuple=True)  # row-major: sorted by (text, image)
    rescored = torch.full((T, I), float("nan"), dtype=torch.float32, device=first.device)
    rescored[t_idx, i_idx] = scorer(t_idx, i_idx).float().to(first.device)
    t2i = two_stage_order(first, rescored, members_t2i, positives)
    i2t = two_stage_order(first.T, rescored.T, members_i2t, positives.T)
    return Reranked(
        t2i_ranks=rank_in_order(t2i, positives),
        i2t_ranks=rank_in_order(i2t, positives.T),
        t2i_top=t2i[:, :top],
        i2t_top=i2t[:, :top],
        pairs_scored=int(t_idx.numel()),
    )


def exhaustive_scores(T: int, I: int, scorer: PairScorer, device: torch.device | None = None) -> Tensor:
    """``(T, I)``: ``scorer`` on every pair, in the same sorted order :func:`rerank` uses."""
    t_idx, i_idx = torch.ones(T, I, dtype=torch.bool, device=device).nonzero(as_tuple=True)
    return scorer(t_idx, i_idx).float().reshape(T, I)


class RetrievalRecall(Metric):
    """Recall@K in both directions and their sum, from ranks (see :func:`pessimistic_rank`).

    ``update(direction, ranks)``: ``direction`` ``"t2i"`` (text queries) or ``"i2t"`` (image queries),
    ``ranks`` ``(Q,)`` long, 0 = no correct candidate (a miss at every K). ``compute()`` returns
    ``{"": rsum, "t2i_r1": ..., "i2t_r10": ...}`` as fractions; ``rsum`` sums the ``2 x len(ks)`` recalls.
    States are sums: correct under DDP when each process feeds disjoint queries.
    """

    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = [int(k) for k in ks]
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"recall cut-offs must be >= 1, got {list(ks)}")
        hits = torch.zeros(len(DIRECTIONS), len(self.ks), dtype=torch.long)
        self.add_state("hits", default=hits, dist_reduce_fx="sum")
        self.add_state("queries", default=torch.zeros(len(DIRECTIONS), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, direction: str, ranks: Tensor) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"retrieval direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
        d = DIRECTIONS.index(direction)
        ranks = ranks.to(self.hits.device).long()
        found = ranks > 0
        for j, k in enumerate(self.ks):
            self.hits[d, j] += int((found & (ranks <= k)).sum())
        self.queries[d] += ranks.numel()

    def compute(self) -> dict[str, Tensor]:
        recall = self.hits.float() / self.queries.clamp(min=1).float()[:, None]
        out = {"": recall.sum()}
        for d, direction in enumerate(DIRECTIONS):
            for j, k in enumerate(self.ks):
                out[f"{direction}_r{k}"] = recall[d, j]
        return out
