"""The contract every fuser keeps (shapes, token map, VE-dropout, encoder weights) and the grid helpers."""

import pytest
import torch

from fusion.fusers import (
    MIXED_GROUP,
    ChannelConcatFuser,
    GatedFuser,
    ResamplerFuser,
    TokenConcatFuser,
    resample_grid,
)
from fusion.model.transformer import FusionModel

# Two encoders with different widths and grids: a 4x4 grid and a 6x6 grid, one [CLS] each.
DIMS = {"a": 8, "b": 12}
TOKENS = {"a": 1 + 16, "b": 1 + 36}
PREFIX = {"a": 1, "b": 1}
FUSERS = {"token_concat": TokenConcatFuser, "channel_concat": ChannelConcatFuser, "resampler": ResamplerFuser,
          "gated": GatedFuser}
NUM_QUERIES = 32  # ResamplerFuser's default


def _fuser(kind, tokens_per_encoder=None, **kwargs):
    torch.manual_seed(0)
    return FUSERS[kind](DIMS, TOKENS, width=16, encoder_prefix=PREFIX, tokens_per_encoder=tokens_per_encoder, **kwargs)


def _model(kind, tokens_per_encoder=None):
    torch.manual_seed(0)
    return FusionModel(
        DIMS, TOKENS, text_dim=16, width=16, depth=1, num_heads=2, dropout=0.0, fuser=FUSERS[kind],
        encoder_prefix=PREFIX, tokens_per_encoder=tokens_per_encoder,
    ).eval()


def _inputs(B=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    feats = {n: torch.randn(B, TOKENS[n], d, generator=gen) for n, d in DIMS.items()}
    text = torch.randn(B, 4, 16, generator=gen)
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)[:B]
    return feats, text, text_mask


# Expected number of visual tokens without / with tokens_per_encoder=4 (a 2x2 grid).
EXPECTED_TOKENS = {
    "token_concat": (17 + 37, (1 + 4) * 2),
    "channel_concat": (1 + 36, 1 + 4),  # the common grid is the larger 6x6 one, or 2x2
    "resampler": (NUM_QUERIES, NUM_QUERIES),
    "gated": (1 + 36, 1 + 4),
}


@pytest.mark.parametrize("kind", FUSERS)
@pytest.mark.parametrize("reduce", [False, True], ids=["all_tokens", "k4"])
def test_shapes_and_token_map(kind, reduce):
    fuser = _fuser(kind, tokens_per_encoder=4 if reduce else None)
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    out = fuser(feats, keep, text, text_mask)
    n = EXPECTED_TOKENS[kind][reduce]
    assert out.tokens.shape == (3, n, 16) and fuser.num_tokens == n
    assert out.token_encoder.shape == (n,) and out.visible.shape == (3, n)
    if kind == "token_concat":
        per_encoder = [5, 5] if reduce else [17, 37]
        assert out.token_encoder.tolist() == [0] * per_encoder[0] + [1] * per_encoder[1]
        assert torch.equal(out.visible, keep[:, out.token_encoder])
        assert not fuser.mixes_encoders and out.encoder_weights is None
    else:
        assert torch.all(out.token_encoder == MIXED_GROUP) and out.visible.all()
        assert fuser.mixes_encoders and fuser.reports_encoder_weights


@pytest.mark.parametrize("kind", FUSERS)
def test_dropped_encoder_does_not_influence_the_output(kind):
    model = _model(kind)
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, False], [True, False], [False, True]])
    base = model(feats, keep, text, text_mask)
    changed = {
        "a": torch.where(keep[:, 0, None, None], feats["a"], torch.randn_like(feats["a"]) * 10),
        "b": torch.where(keep[:, 1, None, None], feats["b"], torch.randn_like(feats["b"]) * 10),
    }
    again = model(changed, keep, text, text_mask)
    torch.testing.assert_close(again.pooled, base.pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(again.hidden[base.key_mask], base.hidden[base.key_mask], atol=1e-6, rtol=0)
    if base.encoder_weights is not None:
        torch.testing.assert_close(again.encoder_weights, base.encoder_weights, atol=1e-6, rtol=0)
    # Kept, the same change does move the output.
    keep_all = torch.ones(3, 2, dtype=torch.bool)
    assert not torch.allclose(model(feats, keep_all, text, text_mask).pooled,
                              model(changed, keep_all, text, text_mask).pooled, atol=1e-4)


@pytest.mark.parametrize("kind", ["channel_concat", "resampler", "gated"])
def test_encoder_weights_sum_to_one_over_kept_encoders(kind):
    fuser = _fuser(kind)
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    weights = fuser(feats, keep, text, text_mask).encoder_weights
    assert weights.shape == (3, 2) and not weights.requires_grad
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    assert torch.all(weights[~keep] == 0) and torch.all(weights[keep] > 0)


@pytest.mark.parametrize("kind", FUSERS)
def test_input_errors_are_named(kind):
    fuser = _fuser(kind)
    feats, text, text_mask = _inputs(B=2)
    with pytest.raises(ValueError, match=r"samples \[1\] keep no encoder"):
        fuser(feats, torch.tensor([[True, False], [False, False]]), text, text_mask)
    with pytest.raises(KeyError, match="'b'"):
        fuser({"a": feats["a"]}, torch.ones(2, 2, dtype=torch.bool), text, text_mask)
    with pytest.raises(ValueError, match=r"keep of shape \(2, 2\)"):
        fuser(feats, torch.ones(2, 3, dtype=torch.bool), text, text_mask)


@pytest.mark.parametrize("kind", FUSERS)
def test_non_square_grid_and_bad_k_are_named(kind):
    tokens = {"a": 17, "b": 1 + 35}  # b: 35 patches
    with pytest.raises(ValueError, match="'b'.*35 patch tokens.*square"):
        FUSERS[kind](DIMS, tokens, width=16, encoder_prefix=PREFIX, tokens_per_encoder=4)
    with pytest.raises(ValueError, match="tokens_per_encoder=5 is not a perfect square"):
        FUSERS[kind](DIMS, TOKENS, width=16, encoder_prefix=PREFIX, tokens_per_encoder=5)


def test_token_concat_keeps_any_token_count_without_reduction():
    # No grid needed: 2 and 4 patches with 1 prefix token each are fine as long as nothing is pooled.
    fuser = TokenConcatFuser({"a": 8, "b": 12}, {"a": 3, "b": 5}, width=16)
    assert fuser.num_tokens == 8
    with pytest.raises(ValueError, match="exceeds encoder 'a'"):
        TokenConcatFuser(DIMS, TOKENS, width=16, encoder_prefix=PREFIX, tokens_per_encoder=25)


def test_encoder_type_embedding_tags_tokens():
    fuser = TokenConcatFuser({"a": 4, "b": 4}, {"a": 2, "b": 2}, width=8)
    with torch.no_grad():
        for p in fuser.pos_embed.values():
            p.zero_()
    same = torch.ones(1, 2, 4)
    # Identical features from two encoders differ only by projection and type embedding.
    fuser.proj["b"].load_state_dict(fuser.proj["a"].state_dict())
    out = fuser({"a": same, "b": same}, torch.ones(1, 2, dtype=torch.bool))
    diff = out.tokens[0, 2] - out.tokens[0, 0]
    torch.testing.assert_close(diff, fuser.type_embed[1] - fuser.type_embed[0])


# ---- token reduction and resampling on small grids, by hand ----------------------------------------


def test_reduction_pools_a_3x3_grid_to_2x2_and_keeps_the_prefix_tokens():
    # Two prefix tokens ([CLS] + a register) and a 3x3 grid of scalar features 0..8.
    fuser = TokenConcatFuser({"e": 1}, {"e": 2 + 9}, width=4, encoder_prefix={"e": 2}, tokens_per_encoder=4)
    x = torch.cat([torch.tensor([-1.0, -2.0]), torch.arange(9.0)]).reshape(1, 11, 1)
    reduced = fuser.reduce("e", x)
    # Adaptive pooling 3 -> 2 uses the overlapping windows rows/cols {0, 1} and {1, 2}:
    # [[0, 1, 2], [3, 4, 5], [6, 7, 8]] -> [[(0+1+3+4)/4, (1+2+4+5)/4], [(3+4+6+7)/4, (4+5+7+8)/4]].
    assert reduced.flatten().tolist() == [-1.0, -2.0, 2.0, 3.0, 5.0, 6.0]
    assert fuser.num_tokens == 2 + 4 and fuser.token_encoder.tolist() == [0] * 6
    out = fuser({"e": x}, torch.ones(1, 1, dtype=torch.bool))
    assert out.tokens.shape == (1, 6, 4)


def test_resample_grid_pools_down_and_interpolates_up():
    grid = torch.arange(16.0).reshape(1, 16, 1)  # 4x4, row-major
    pooled = resample_grid(grid, 2).flatten().tolist()
    assert pooled == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]
    # Bilinear 2 -> 4 without corner alignment samples at -0.25, 0.25, 0.75, 1.25 (clamped to the edges).
    small = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    expected = up @ small @ up.T
    torch.testing.assert_close(resample_grid(small.reshape(1, 4, 1), 4).reshape(4, 4), expected)
    assert resample_grid(grid, 4) is grid


def test_channel_concat_interpolates_encoders_to_the_common_grid_and_projects_once():
    dims, tokens = {"a": 3, "b": 5}, {"a": 1 + 4, "b": 1 + 16}  # 2x2 and 4x4 grids
    torch.manual_seed(0)
    fuser = ChannelConcatFuser(dims, tokens, width=6)
    assert fuser.side == 4 and fuser.num_tokens == 1 + 16
    xa, xb = torch.randn(2, 5, 3), torch.randn(2, 17, 5)
    # a's 2x2 grid, bilinearly upsampled, channel by channel (same weights as above), [CLS] first.
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    grid_a = torch.einsum("ip,bpqc,jq->bijc", up, xa[:, 1:].reshape(2, 2, 2, 3), up).reshape(2, 16, 3)
    a_common = torch.cat([xa[:, :1], grid_a], dim=1)
    torch.testing.assert_close(fuser.to_common_grid("a", xa, 4), a_common)

    keep = torch.tensor([[True, True], [False, True]])
    out = fuser({"a": xa, "b": xb}, keep)
    na, nb = fuser.norm["a"](a_common), fuser.norm["b"](xb)
    # Sample 0 keeps both: one Linear over the channel concatenation. Sample 1 drops a: its channels
    # are zero and b's are scaled by n_enc / n_kept = 2.
    full = fuser.proj(torch.cat([na, nb], dim=-1)) + fuser.pos_embed
    dropped = fuser.proj(torch.cat([torch.zeros_like(na), 2 * nb], dim=-1)) + fuser.pos_embed
    torch.testing.assert_close(out.tokens[0], full[0])
    torch.testing.assert_close(out.tokens[1], dropped[1])
    # Contribution of each encoder: mean over tokens of ||W[:, channels_e] x_e||, normalised.
    w = fuser.proj.weight
    contrib = torch.stack([(na[0] @ w[:, :3].T).norm(dim=-1).mean(), (nb[0] @ w[:, 3:].T).norm(dim=-1).mean()])
    torch.testing.assert_close(out.encoder_weights[0], contrib / contrib.sum())
    assert out.encoder_weights[1].tolist() == [0.0, 1.0]


def test_resampler_mass_with_uniform_attention_is_each_encoders_share_of_the_keys():
    fuser = _fuser("resampler", num_queries=3, depth=2)
    for layer in fuser.layers:  # zero queries -> equal scores -> uniform attention over visible keys
        torch.nn.init.zeros_(layer.attn.q.weight)
        torch.nn.init.zeros_(layer.attn.q.bias)
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    weights = fuser(feats, keep, text, text_mask).encoder_weights
    expected = torch.tensor([[17 / 54, 37 / 54], [1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(weights, expected)
    # K output tokens whatever the number of encoders.
    one = ResamplerFuser({"a": 8}, {"a": 17}, width=16, num_queries=3)
    assert one.num_tokens == fuser.num_tokens == 3


def test_gate_is_a_text_conditioned_softmax_over_kept_encoders():
    fuser = _fuser("gated").eval()
    feats, text, text_mask = _inputs()
    keep = torch.tensor([[True, True], [True, True], [False, True]])
    out = fuser(feats, keep, text, text_mask)
    # By hand from the fuser's pieces: projections on the common 6x6 grid, gate on [text mean; encoder mean].
    proj = torch.stack([fuser.proj[n](fuser.to_common_grid(n, feats[n], 6)) for n in DIMS], dim=1)
    t = torch.stack([text[b, text_mask[b]].mean(0) for b in range(3)])
    logits = fuser.gate(torch.cat([t[:, None].expand(-1, 2, -1), proj.mean(2)], -1)).squeeze(-1)
    gate = logits.masked_fill(~keep, float("-inf")).softmax(1)
    torch.testing.assert_close(out.encoder_weights, gate)
    torch.testing.assert_close(out.tokens, (gate[:, :, None, None] * proj).sum(1) + fuser.pos_embed)
    # Another question, another gate.
    other = fuser(feats, keep, torch.randn_like(text), text_mask).encoder_weights
    assert not torch.allclose(other[:2], out.encoder_weights[:2])
    with pytest.raises(ValueError, match="text"):
        fuser(feats, keep)
