"""Retrieval ranking: pessimistic ranks, Recall@K by hand, and re-ranking vs exhaustive scoring."""

from __future__ import annotations

import pytest
import torch

from fusion.metrics.ranking import (
    RetrievalRecall,
    exhaustive_scores,
    pessimistic_rank,
    rank_in_order,
    rerank,
    top_candidates,
    two_stage_order,
)


def test_rank_counts_ties_against_the_model():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1, 0.3],  # positive first
            [0.5, 0.5, 0.5, 0.5],  # constant scorer: all three wrong ones tie with it
            [0.2, 0.9, 0.2, 0.1],  # one wrong above, one tied
            [0.7, 0.8, 0.1, 0.7],  # two positives (cols 0, 3): best 0.7; col 1 above, none tied
        ]
    )
    positives = torch.zeros(4, 4, dtype=torch.bool)
    positives[0, 0] = positives[1, 2] = positives[2, 0] = positives[3, 0] = positives[3, 3] = True
    assert pessimistic_rank(scores, positives).tolist() == [1, 4, 3, 2]
    # Positives tied with each other do not push each other down.
    assert pessimistic_rank(torch.zeros(1, 3), torch.tensor([[True, True, False]])).tolist() == [2]
    # Restricted to members; no positive among them -> 0.
    members = torch.tensor([[True, False, True, True]] * 4)
    assert pessimistic_rank(scores, positives, members).tolist() == [1, 3, 2, 1]
    assert pessimistic_rank(scores[:1], positives[:1], ~positives[:1]).tolist() == [0]


def test_recall_by_hand_including_ties_and_misses():
    metric = RetrievalRecall()
    metric.update("t2i", torch.tensor([1, 2, 5, 6, 10, 11, 0, 1]))  # 0: no correct candidate = miss
    metric.update("i2t", torch.tensor([1, 1, 3, 12]))
    out = {k: round(float(v), 6) for k, v in metric.compute().items()}
    expected = {"t2i_r1": 2 / 8, "t2i_r5": 4 / 8, "t2i_r10": 6 / 8, "i2t_r1": 2 / 4, "i2t_r5": 3 / 4, "i2t_r10": 3 / 4}
    assert out == {**{k: round(v, 6) for k, v in expected.items()}, "": round(sum(expected.values()), 6)}
    # A constant scorer over 4 images and 20 captions (5 per image): never R@1.
    positives = torch.arange(20)[:, None] // 5 == torch.arange(4)[None, :]
    constant = RetrievalRecall()
    constant.update("t2i", pessimistic_rank(torch.zeros(20, 4), positives))
    constant.update("i2t", pessimistic_rank(torch.zeros(4, 20), positives.T))
    out = constant.compute()
    assert out["t2i_r1"] == 0 and out["t2i_r5"] == 1 and out["i2t_r1"] == 0 and out["i2t_r10"] == 0
    with pytest.raises(ValueError, match="direction 'x2y' is not one of t2i, i2t"):
        constant.update("x2y", torch.tensor([1]))


def _problem(T=15, I=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(T, I, generator=g)
    expensive = torch.randn(T, I, generator=g)
    positives = torch.arange(T)[:, None] // (T // I) == torch.arange(I)[None, :]
    calls = []

    def scorer(t_idx, i_idx):
        calls.append((t_idx.clone(), i_idx.clone()))
        return expensive[t_idx, i_idx]

    return first, expensive, positives, scorer, calls


@pytest.mark.parametrize("k", [15, 16, 100])
def test_k_at_least_the_candidate_count_equals_exhaustive_scoring(k):
    first, _, positives, scorer, calls = _problem()
    result = rerank(first, positives, k, scorer)
    full = exhaustive_scores(15, 5, scorer)
    assert torch.equal(calls[0][0], calls[1][0]) and torch.equal(calls[0][1], calls[1][1])  # the same calls
    assert torch.equal(result.t2i_ranks, pessimistic_rank(full, positives))
    assert torch.equal(result.i2t_ranks, pessimistic_rank(full.T, positives.T))
    assert torch.equal(result.t2i_top, full.argsort(dim=1, descending=True)[:, :10])
    assert torch.equal(result.i2t_top, full.T.argsort(dim=1, descending=True)[:, :10])
    assert result.pairs_scored == 75


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_small_k_differs_only_through_the_first_stage(k):
    first, expensive, positives, scorer, _ = _problem()
    exhaustive = pessimistic_rank(expensive, positives)
    result = rerank(first, positives, k, scorer)
    members = torch.zeros(15, 5, dtype=torch.bool)
    members[torch.arange(15)[:, None], first.topk(k, dim=1).indices] = True
    found = (members & positives).any(dim=1)
    # A found positive ranks among fewer competitors: never worse than exhaustive scoring.
    assert (result.t2i_ranks[found] <= exhaustive[found]).all()
    # A missed one comes after the k candidates, in first-stage order.
    assert (result.t2i_ranks[~found] > k).all()
    # With a first stage that orders like the expensive scorer, R@K for K <= k is exactly exhaustive.
    perfect = rerank(expensive, positives, k, scorer)
    for K in range(1, k + 1):
        assert torch.equal(perfect.t2i_ranks <= K, exhaustive <= K)
        assert torch.equal(perfect.i2t_ranks <= K, pessimistic_rank(expensive.T, positives.T) <= K)


def test_each_pair_is_scored_once_and_only_candidates():
    first, _, positives, scorer, calls = _problem()
    result = rerank(first, positives, 2, scorer)
    t_idx, i_idx = calls[0]
    pairs = set(zip(t_idx.tolist(), i_idx.tolist(), strict=True))
    assert len(pairs) == len(t_idx) == result.pairs_scored
    t2i = {(t, i) for t in range(15) for i in first[t].topk(2).indices.tolist()}
    i2t = {(t, i) for i in range(5) for t in first[:, i].topk(2).indices.tolist()}
    assert pairs == t2i | i2t
    assert sorted(pairs) == list(zip(t_idx.tolist(), i_idx.tolist(), strict=True))  # sorted (text, image)


def test_order_puts_candidates_first_and_breaks_ties_against_the_model():
    first = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    rescored = torch.tensor([[1.0, 2.0, 1.0, float("nan"), float("nan")]])
    members = torch.tensor([[True, True, True, False, False]])
    # Candidates 0 and 2 tie at 1.0; both wrong: the lower index first.
    none = torch.zeros(1, 5, dtype=torch.bool)
    assert two_stage_order(first, rescored, members, none).tolist() == [[1, 0, 2, 3, 4]]
    # Candidate 0 correct: the tied wrong candidate 2 goes before it, so its rank is 3, not 2.
    positives = torch.tensor([[True, False, False, False, False]])
    order = two_stage_order(first, rescored, members, positives)
    assert order.tolist() == [[1, 2, 0, 3, 4]]
    assert rank_in_order(order, positives).tolist() == [3]
    # A candidate scoring -inf still precedes every non-candidate.
    rescored[0, 1] = float("-inf")
    assert two_stage_order(first, rescored, members, none).tolist() == [[0, 2, 1, 3, 4]]
    # A correct non-candidate comes after the 3 candidates, then by the first stage (tie with 4 -> 4 first).
    first[0, 4] = first[0, 3]
    positives = torch.tensor([[False, False, False, True, False]])
    order = two_stage_order(first, rescored, members, positives)
    assert order.tolist() == [[0, 2, 1, 4, 3]] and rank_in_order(order, positives).tolist() == [5]
    assert rank_in_order(order, none).tolist() == [0]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ranks_and_top_lists_come_from_one_order_even_with_ties(k):
    # Scores on a coarse grid: ties everywhere, in both stages.
    g = torch.Generator().manual_seed(1)
    first = torch.randint(0, 3, (15, 5), generator=g).float()
    expensive = torch.randint(0, 3, (15, 5), generator=g).float()
    positives = torch.arange(15)[:, None] // 3 == torch.arange(5)[None, :]
    result = rerank(first, positives, k, lambda t, i: expensive[t, i], top=10)
    for ranks, top, pos, scores, firsts in (
        (result.t2i_ranks, result.t2i_top, positives, expensive, first),
        (result.i2t_ranks, result.i2t_top, positives.T, expensive.T, first.T),
    ):
        members = torch.zeros_like(pos)
        members[torch.arange(len(pos))[:, None], top_candidates(firsts, k)] = True
        # The rank is read off the written top list: the 1-based position of the first correct entry...
        for q in range(len(pos)):
            listed = top[q].tolist()
            hit = [n + 1 for n, j in enumerate(listed) if pos[q, j]]
            assert (hit[0] if hit else None) == (int(ranks[q]) if 0 < ranks[q] <= len(listed) else None)
        # ... and is the pessimistic rank among the re-scored candidates, else after them by the first stage.
        among = pessimistic_rank(scores, pos, members)
        rest = members.sum(dim=1) + pessimistic_rank(firsts, pos, ~members)
        assert torch.equal(ranks, torch.where(among > 0, among, rest))


def test_rerank_k_must_be_positive():
    first, _, positives, scorer, _ = _problem()
    with pytest.raises(ValueError, match="rerank k must be >= 1"):
        rerank(first, positives, 0, scorer)
