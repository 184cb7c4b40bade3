"""fusion.study.utilisation: effective rank and Capacity / Necessity / masking shares on hand-made numbers."""

import math

import pytest
import torch
from test_study_agreement import analysed, rows

from fusion.study.utilisation import effective_rank, utilisation


def test_effective_rank_by_hand():
    # Identity: three equal singular values, exp(ln 3) = 3; centred its rows span a plane: s = (1, 1, 0) -> 2.
    assert effective_rank(torch.eye(3), centre=False) == pytest.approx(3.0)
    assert effective_rank(torch.eye(3)) == pytest.approx(2.0)
    # diag(3, 1): p = (0.75, 0.25), exp(-(0.75 ln 0.75 + 0.25 ln 0.25)).
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0])), centre=False) == pytest.approx(expected)
    # Rank one (an outer product): 1; every token equal, centred: no direction, 0.
    outer = torch.outer(torch.arange(1.0, 5.0), torch.tensor([1.0, 2.0]))
    assert effective_rank(outer, centre=False) == pytest.approx(1.0)
    assert effective_rank(torch.ones(4, 3)) == 0.0
    with pytest.raises(ValueError, match="matrix"):
        effective_rank(torch.ones(3))


def test_capacity_necessity_and_shares_retrained_and_masked():
    masking = {0: {"a": {"changed": 0.5, "helped": 0.25, "hurt": 0.1}}, 1: {"a": {"changed": 0.3, "helped": 0.05,
                                                                                    "hurt": 0.2}}}
    ranks = {"a+b-0": {"features": {"a": 3.0, "b": 2.0}, "projected": {"a": 4.0, "b": None}},
             "a+b-1": {"features": {"a": 5.0, "b": 2.0}, "projected": {"a": 6.0, "b": None}},
             "a-0": {"features": {"a": 9.0}, "projected": {"a": 9.0}}}  # not the all-encoder subset
    u = utilisation(rows(), analysed(masking), "test/acc", ranks)
    assert u["encoders"] == ["a", "b"] and u["all"] == "a+b"
    a = u["by_encoder"]["a"]
    # Retrained a alone: 0.5, 0.6; masked to a: 0.4, 0.3.
    assert a["capacity_retrained"]["mean"] == pytest.approx(0.55)
    assert a["capacity_masked"]["per_seed"] == pytest.approx({"0": 0.4, "1": 0.3})
    # Necessity: f(a+b) - f(b) per seed; retrained 0.7 - 0.6, 0.8 - 0.5; masked 0.7 - 0.55, 0.8 - 0.45.
    assert a["necessity_retrained"]["per_seed"] == pytest.approx({"0": 0.1, "1": 0.3})
    assert a["necessity_masked"]["mean"] == pytest.approx(0.25)
    assert a["changed"]["mean"] == pytest.approx(0.4) and a["helped"]["per_seed"] == pytest.approx({"0": 0.25,
                                                                                                     "1": 0.05})
    assert a["erank_features"]["mean"] == pytest.approx(4.0) and a["erank_projected"]["mean"] == pytest.approx(5.0)
    b = u["by_encoder"]["b"]
    assert b["necessity_retrained"]["per_seed"] == pytest.approx({"0": 0.2, "1": 0.2})
    assert b["changed"] is None and b["erank_projected"] is None
