import math

import pytest
import torch
import torch.nn.functional as F

from fusion.model.attention import (
    ATTENTION_SCORES,
    AdditiveScore,
    MultiHeadSelfAttention,
    TransformerBlock,
    build_score,
)

FUSED = {"dot", "scaled_dot", "general", "biased_general", "cosine"}
LEARNED = sorted(set(ATTENTION_SCORES) - {"dot", "scaled_dot"})


def _inputs(B=2, S=6, D=16):
    torch.manual_seed(0)
    x = torch.randn(B, S, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 2] = False
    return x, mask


def _attn(score="scaled_dot", **kwargs):
    torch.manual_seed(0)
    return MultiHeadSelfAttention(16, 4, score=score, **kwargs).eval()


def _qk(attn, x):
    B, S, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(B, S, 3, 4, 4).permute(2, 0, 3, 1, 4)
    return q, k


def _masked_softmax(scores, mask):
    """Reference: softmax over the visible keys only; masked keys get 0."""
    expected = torch.zeros_like(scores)
    for b in range(scores.shape[0]):
        visible = mask[b].nonzero().squeeze(1)
        expected[b][:, :, visible] = scores[b][:, :, visible].softmax(-1)
    return expected


def _perturb(attn):
    """Move learned score parameters off their initial values so tests see their effect."""
    with torch.no_grad():
        for p in attn.score.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("score", ATTENTION_SCORES)
def test_probabilities_shape_rows_sum_to_one_and_masked_keys_get_zero(score):
    x, mask = _inputs()
    attn = _attn(score)
    _perturb(attn)
    out, probs = attn(x, mask, need_weights=True)
    assert out.shape == x.shape and probs.shape == (2, 4, 6, 6)
    assert torch.all(probs[0, :, :, 4:] == 0)
    assert torch.all(probs[1, :, :, 2] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))


@pytest.mark.parametrize("score", ATTENTION_SCORES)
def test_explicit_path_matches_fused_kernel(score, monkeypatch):
    x, mask = _inputs()
    attn = _attn(score)
    _perturb(attn)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    fused, none = attn(x, mask, need_weights=False)
    explicit, probs = attn(x, mask, need_weights=True)
    assert none is None and probs is not None
    assert attn.score.fused == (score in FUSED)
    assert len(calls) == (score in FUSED)  # the fused kernel runs only when no read-out is asked for
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_scaled_dot_matches_hand_computation():
    x, mask = _inputs()
    attn = _attn("scaled_dot")
    _, probs = attn(x, mask, need_weights=True)
    q, k = _qk(attn, x)
    expected = _masked_softmax(q @ k.transpose(-2, -1) / 2.0, mask)  # head_dim 4 -> scale 1/2
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_dot_matches_hand_computation():
    x, mask = _inputs()
    attn = _attn("dot")
    _, probs = attn(x, mask, need_weights=True)
    q, k = _qk(attn, x)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
    torch.testing.assert_close(probs, _masked_softmax(scores, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("score", ["general", "biased_general", "activated_general"])
def test_bilinear_scores_match_hand_computation(score):
    x, mask = _inputs()
    attn = _attn(score)
    W = torch.randn(4, 4, 4)
    b = torch.randn(4, 4)
    with torch.no_grad():
        attn.score.weight.copy_(W)
        if attn.score.bias is not None:
            attn.score.bias.copy_(b)
    _, probs = attn(x, mask, need_weights=True)
    q, k = _qk(attn, x)
    scores = torch.einsum("bhqi,hij,bhkj->bhqk", q, W, k)
    if score != "general":
        scores = scores + torch.einsum("hi,bhki->bhk", b, k)[:, :, None, :]  # b . k_j, one value per key
    if score == "activated_general":
        scores = torch.tanh(scores)
    torch.testing.assert_close(probs, _masked_softmax(scores, mask), atol=1e-5, rtol=1e-5)


def test_general_starts_as_scaled_dot():
    x, mask = _inputs()
    out, probs = _attn("general")(x, mask, need_weights=True)
    ref_out, ref_probs = _attn("scaled_dot")(x, mask, need_weights=True)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(out, ref_out)


def test_additive_matches_hand_computation():
    x, mask = _inputs()
    attn = _attn("additive")
    W, U, v = torch.randn(4, 4, 4), torch.randn(4, 4, 4), torch.randn(4, 4)
    with torch.no_grad():
        attn.score.w_q.copy_(W)
        attn.score.w_k.copy_(U)
        attn.score.v.copy_(v)
    _, probs = attn(x, mask, need_weights=True)
    q, k = _qk(attn, x)
    scores = torch.zeros(2, 4, 6, 6)
    for b in range(2):
        for h in range(4):
            for i in range(6):
                for j in range(6):
                    scores[b, h, i, j] = v[h] @ torch.tanh(W[h].T @ q[b, h, i] + U[h].T @ k[b, h, j])
    torch.testing.assert_close(probs, _masked_softmax(scores, mask), atol=1e-5, rtol=1e-5)


def test_additive_chunks_match_whole_in_values_and_gradients():
    torch.manual_seed(0)
    whole = AdditiveScore(num_heads=2, head_dim=4, attn_dim=3)
    chunked = AdditiveScore(num_heads=2, head_dim=4, attn_dim=3, max_chunk_elements=2 * 2 * 7 * 3 * 2)  # 2 rows
    chunked.load_state_dict(whole.state_dict())
    q, k = torch.randn(2, 2, 7, 4, requires_grad=True), torch.randn(2, 2, 7, 4)
    ref = whole(q, k)
    out = chunked(q, k)
    torch.testing.assert_close(out, ref)
    target = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad((ref * target).sum(), q)
    (grad,) = torch.autograd.grad((out * target).sum(), q)
    torch.testing.assert_close(grad, ref_grad)
    for p_whole, p_chunked in zip(whole.parameters(), chunked.parameters(), strict=True):
        (g_whole,) = torch.autograd.grad((whole(q, k) * target).sum(), p_whole)
        (g_chunked,) = torch.autograd.grad((chunked(q, k) * target).sum(), p_chunked)
        torch.testing.assert_close(g_chunked, g_whole)
    with torch.no_grad():
        torch.testing.assert_close(chunked(q, k), ref)


def test_cosine_is_cosine_over_temperature():
    x, mask = _inputs()
    attn = _attn("cosine")
    assert torch.allclose(attn.score.temperature, torch.full((4,), 0.5))  # 1/sqrt(head_dim) at init
    with torch.no_grad():
        attn.score.log_scale.copy_(torch.tensor([0.0, 1.0, 2.0, math.log(1000.0)]))
    tau = torch.tensor([1.0, math.exp(-1.0), math.exp(-2.0), 0.01])  # last one clamped at scale 100
    torch.testing.assert_close(attn.score.temperature, tau)
    _, probs = attn(x, mask, need_weights=True)
    q, k = _qk(attn, x)
    cos = F.cosine_similarity(q[:, :, :, None, :], k[:, :, None, :, :], dim=-1)
    assert cos.abs().max() <= 1 + 1e-6
    scores = cos / tau[:, None, None]
    torch.testing.assert_close(probs, _masked_softmax(scores, mask), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("score", LEARNED)
def test_learned_score_parameters_receive_gradients(score, need_weights):
    x, mask = _inputs()
    attn = _attn(score)
    _perturb(attn)
    out, _ = attn(x, mask, need_weights=need_weights)
    (out * torch.randn_like(out)).sum().backward()
    params = dict(attn.score.named_parameters())
    assert params
    for name, p in params.items():
        # Not just nonzero: a parameter the softmax is invariant to gets rounding-noise gradients (~1e-7).
        assert p.grad is not None and p.grad.abs().max() > 1e-3, name


@pytest.mark.parametrize("score", ATTENTION_SCORES)
def test_attention_dropout_applies_to_all_scores_and_read_out_is_before_dropout(score):
    x, mask = _inputs()
    attn = _attn(score, attn_drop=0.5).train()
    torch.manual_seed(1)
    out1, probs = attn(x, mask, need_weights=True)
    out2, _ = attn(x, mask, need_weights=True)
    assert not torch.allclose(out1, out2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))
    assert torch.all(probs[0, :, :, 4:] == 0)


@pytest.mark.parametrize("score", ATTENTION_SCORES)
def test_every_score_can_train(score):
    """A few optimiser steps fit a block to a target that needs token mixing (mean over visible tokens)."""
    x, mask = _inputs(B=4, S=8)
    target = (x * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    target = target.expand_as(x)
    torch.manual_seed(0)
    block = TransformerBlock(16, 4, mlp_ratio=2.0, score=score)
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        out, _ = block(x, mask)
        loss = F.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.2 * losses[0], losses


def test_block_keeps_shape_and_returns_probs_only_when_asked():
    x, mask = _inputs()
    block = TransformerBlock(16, 4, dropout=0.0).eval()
    out, probs = block(x, mask)
    assert out.shape == x.shape and probs is None
    out2, probs2 = block(x, mask, need_weights=True)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    assert probs2.shape == (2, 4, 6, 6)


def test_scaled_dot_adds_no_parameters():
    # Checkpoints from before score functions existed must still load.
    assert set(MultiHeadSelfAttention(16, 4).state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_unknown_score_names_it_and_lists_allowed():
    for make in (lambda: build_score("softmax", 4, 4), lambda: TransformerBlock(16, 4, score="softmax")):
        with pytest.raises(ValueError) as err:
            make()
        assert "'softmax'" in str(err.value)
        assert all(name in str(err.value) for name in ATTENTION_SCORES)


def test_width_must_divide_heads():
    try:
        MultiHeadSelfAttention(10, 4)
    except ValueError as err:
        assert "10" in str(err) and "4" in str(err)
    else:
        raise AssertionError("expected ValueError")
