import torch

from fusion.attention import MultiHeadSelfAttention, TransformerBlock


def _inputs(B=2, S=6, D=16):
    torch.manual_seed(0)
    x = torch.randn(B, S, D)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 2] = False
    return x, mask


def test_explicit_path_matches_fused_kernel():
    x, mask = _inputs()
    attn = MultiHeadSelfAttention(16, 4).eval()
    fused, none = attn(x, mask, need_weights=False)
    explicit, probs = attn(x, mask, need_weights=True)
    assert none is None
    assert probs.shape == (2, 4, 6, 6)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)


def test_probabilities_match_hand_computation_and_masked_keys_get_zero():
    x, mask = _inputs()
    attn = MultiHeadSelfAttention(16, 4).eval()
    _, probs = attn(x, mask, need_weights=True)
    q, k, _ = attn.qkv(x).reshape(2, 6, 3, 4, 4).permute(2, 0, 3, 1, 4)
    expected = torch.zeros(2, 4, 6, 6)
    for b in range(2):
        visible = mask[b].nonzero().squeeze(1)
        scores = q[b] @ k[b][:, visible].transpose(-2, -1) / 2.0  # head_dim 4 -> scale 1/2
        expected[b][:, :, visible] = scores.softmax(-1)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    assert torch.all(probs[0, :, :, 4:] == 0)
    assert torch.all(probs[1, :, :, 2] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))


def test_block_keeps_shape_and_returns_probs_only_when_asked():
    x, mask = _inputs()
    block = TransformerBlock(16, 4, dropout=0.0).eval()
    out, probs = block(x, mask)
    assert out.shape == x.shape and probs is None
    out2, probs2 = block(x, mask, need_weights=True)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    assert probs2.shape == (2, 4, 6, 6)


def test_width_must_divide_heads():
    try:
        MultiHeadSelfAttention(10, 4)
    except ValueError as err:
        assert "10" in str(err) and "4" in str(err)
    else:
        raise AssertionError("expected ValueError")
