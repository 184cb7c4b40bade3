"""Attention-over-encoder statistics (multimodal transformer and LM head): exact masses, accumulation,
validation, files on disk."""

from __future__ import annotations

import csv
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from fusion.monitoring.attention_stats import (
    ANSWER,
    CLS,
    LM_QUERY_KINDS,
    MIXED,
    PAD,
    QUERY_KINDS,
    TEXT,
    AttentionOverEncoders,
    LMAttentionOverEncoders,
    load_stats,
    save_stats,
    scalar_metrics,
    stats_rows,
)

# compute() before update() warns by design in torchmetrics; the zero result is what we test.
pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric:UserWarning")

ENCODERS = ["dino", "clip"]


def hand_batch() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """L=1, H=2, B=2 over [CLS, t, t, pad, e0, e0, e1]; sample 1 has a single real text token."""
    key_groups = torch.tensor([CLS, TEXT, TEXT, TEXT, 0, 0, 1])
    text_mask = torch.tensor(
        [
            [False, True, True, False, False, False, False],
            [False, True, False, False, False, False, False],
        ]
    )
    # Rows of queries that are neither [CLS] nor a real text token must be ignored: put all their mass
    # on e1 so a leak would show up.
    probs = torch.zeros(2, 2, 7, 7)
    probs[..., 6] = 1.0
    rows = {
        # (sample, head, query): probabilities over the 7 keys (pad key 3, and key 2 in sample 1, are 0)
        (0, 0, 0): [0.1, 0.2, 0.1, 0.0, 0.3, 0.1, 0.2],
        (0, 0, 1): [0.0, 0.5, 0.1, 0.0, 0.2, 0.2, 0.0],
        (0, 0, 2): [0.2, 0.0, 0.0, 0.0, 0.0, 0.4, 0.4],
        (0, 1, 0): [0.25, 0.25, 0.0, 0.0, 0.25, 0.0, 0.25],
        (0, 1, 1): [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        (0, 1, 2): [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        (1, 0, 0): [0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0],
        (1, 0, 1): [0.2, 0.2, 0.0, 0.0, 0.2, 0.2, 0.2],
        (1, 0, 2): [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # padding query: not counted
        (1, 1, 0): [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0],
        (1, 1, 1): [0.1, 0.1, 0.0, 0.0, 0.0, 0.0, 0.8],
    }
    for (b, h, q), row in rows.items():
        probs[b, h, q] = torch.tensor(row)
    return [probs], key_groups, text_mask


def random_batch(
    batch: int = 4,
    layers: int = 2,
    heads: int = 3,
    text_lens: list[int] | None = None,
    dropped: int | None = None,
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Softmax attention over [CLS] + 5 text slots + 4 tokens of each of 3 encoders."""
    gen = torch.Generator().manual_seed(seed)
    key_groups = torch.tensor([CLS] + [TEXT] * 5 + [0] * 4 + [1] * 4 + [2] * 4)
    k = key_groups.numel()
    text_lens = text_lens if text_lens is not None else [5, 3, 1, 4][:batch]
    text_mask = torch.zeros(batch, k, dtype=torch.bool)
    key_mask = torch.ones(batch, k, dtype=torch.bool)
    for b, n in enumerate(text_lens):
        text_mask[b, 1 : 1 + n] = True
        key_mask[b, 1 + n : 6] = False  # padding keys
    if dropped is not None:
        key_mask[:, key_groups == dropped] = False
    attentions = []
    for _ in range(layers):
        logits = torch.randn(batch, heads, k, k, generator=gen) * 2
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attentions.append(logits.softmax(dim=-1))
    return attentions, key_groups, text_mask


def test_hand_computed_masses() -> None:
    metric = AttentionOverEncoders(["e0", "e1"], num_layers=1, num_heads=2)
    metric.update(*hand_batch())
    stats = metric.compute()
    assert stats.shape == (2, 1, 2, 4)
    assert metric.group_names == ["e0", "e1", "text", "cls"]
    expected_cls = torch.tensor([[0.2, 0.1, 0.4, 0.3], [0.625, 0.125, 0.125, 0.125]])
    # Per-sample mean over text queries, then mean over samples (not pooled over all text queries).
    expected_text = torch.tensor([[0.4, 0.2, 0.25, 0.15], [0.25, 0.65, 0.05, 0.05]])
    torch.testing.assert_close(stats[0, 0], expected_cls)
    torch.testing.assert_close(stats[1, 0], expected_text)


def test_mixed_tokens_count_as_the_fused_group() -> None:
    # The hand batch with e1's token (key 6) turned into a token that mixes encoders.
    attentions, key_groups, text_mask = hand_batch()
    key_groups = torch.where(key_groups == 1, MIXED, key_groups)
    metric = AttentionOverEncoders(["e0", "e1"], num_layers=1, num_heads=2, mixed=True)
    assert metric.group_names == ["e0", "e1", "fused", "text", "cls"]
    metric.update(attentions, key_groups, text_mask)
    stats = metric.compute()
    assert stats.shape == (2, 1, 2, 5)
    # The masses of test_hand_computed_masses, e1's moved to "fused" and e1 left at 0.
    expected_cls = torch.tensor([[0.2, 0.0, 0.1, 0.4, 0.3], [0.625, 0.0, 0.125, 0.125, 0.125]])
    expected_text = torch.tensor([[0.4, 0.0, 0.2, 0.25, 0.15], [0.25, 0.0, 0.65, 0.05, 0.05]])
    torch.testing.assert_close(stats[0, 0], expected_cls)
    torch.testing.assert_close(stats[1, 0], expected_text)
    scalars = scalar_metrics(stats, metric.group_names)
    assert scalars["attn/cls/layer0/fused"] == pytest.approx(0.1125)


def test_mixed_tokens_need_the_mixed_flag_and_fused_is_reserved() -> None:
    attentions, key_groups, text_mask = hand_batch()
    key_groups = torch.where(key_groups == 1, MIXED, key_groups)
    metric = AttentionOverEncoders(["e0", "e1"], num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"in \[-2, 1\].*got \[-3\]; MIXED \(-3\) tokens need mixed=True"):
        metric.update(attentions, key_groups, text_mask)
    with pytest.raises(ValueError, match="'fused'"):
        AttentionOverEncoders(["a", "fused"], num_layers=1, num_heads=1, mixed=True)


def test_bf16_input_matches_float32() -> None:
    attentions, key_groups, text_mask = random_batch()
    ref = AttentionOverEncoders(ENCODERS + ["siglip"], num_layers=2, num_heads=3)
    ref.update(attentions, key_groups, text_mask)
    low = AttentionOverEncoders(ENCODERS + ["siglip"], num_layers=2, num_heads=3)
    low.update([a.to(torch.bfloat16) for a in attentions], key_groups, text_mask)
    torch.testing.assert_close(low.compute(), ref.compute(), atol=2e-2, rtol=0)


def test_masked_encoder_gets_exactly_zero() -> None:
    attentions, key_groups, text_mask = random_batch(dropped=1)
    metric = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    metric.update(attentions, key_groups, text_mask)
    stats = metric.compute()
    assert stats.shape == (2, 2, 3, 5)
    torch.testing.assert_close(stats.sum(dim=-1), torch.ones(2, 2, 3))
    assert torch.all(stats[..., 1] == 0)
    assert torch.all(stats[..., [0, 2, 3, 4]] > 0)


def test_two_updates_equal_one_concatenated_update() -> None:
    first = random_batch(batch=3, text_lens=[5, 0, 2], seed=1)
    second = random_batch(batch=2, text_lens=[1, 4], seed=2)
    split = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    split.update(*first)
    split.update(*second)
    joint = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    joint.update(
        [torch.cat([a, b]) for a, b in zip(first[0], second[0], strict=True)],
        first[1],
        torch.cat([first[2], second[2]]),
    )
    torch.testing.assert_close(split.compute(), joint.compute())


def test_merged_states_equal_one_metric() -> None:
    # merge_state applies the same sum reduction DDP uses across ranks.
    first, second = random_batch(seed=3), random_batch(seed=4)
    rank0 = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    rank1 = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    rank0.update(*first)
    rank1.update(*second)
    rank0.merge_state(rank1)
    single = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    single.update(*first)
    single.update(*second)
    torch.testing.assert_close(rank0.compute(), single.compute())


def _ddp_worker(rank: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        metric = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
        metric.update(*random_batch(seed=10 + rank))
        stats = metric.compute()
        if rank == 0:
            queue.put(stats.tolist())  # plain data: the worker exits before the parent reads
    finally:
        dist.destroy_process_group()


def test_ddp_reduction_over_two_gloo_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(port, queue), nprocs=2, start_method="spawn")
    reduced = torch.tensor(queue.get(timeout=30))
    single = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    single.update(*random_batch(seed=10))
    single.update(*random_batch(seed=11))
    torch.testing.assert_close(reduced, single.compute())


def test_samples_without_text_do_not_count() -> None:
    with_empty = random_batch(batch=3, text_lens=[2, 0, 4], seed=5)
    metric = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    metric.update(*with_empty)
    assert int(metric.text_count) == 2 and int(metric.cls_count) == 3

    keep = torch.tensor([0, 2])
    only_text = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    only_text.update([a[keep] for a in with_empty[0]], with_empty[1], with_empty[2][keep])
    torch.testing.assert_close(metric.compute()[1], only_text.compute()[1])
    torch.testing.assert_close(metric.compute()[1].sum(-1), torch.ones(2, 3))


def test_no_text_at_all_and_no_update_give_zeros() -> None:
    metric = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    assert torch.equal(metric.compute(), torch.zeros(2, 2, 3, 5))
    metric.update(*random_batch(batch=2, text_lens=[0, 0]))
    stats = metric.compute()
    assert torch.equal(stats[1], torch.zeros(2, 3, 5))
    torch.testing.assert_close(stats[0].sum(-1), torch.ones(2, 3))


def test_validation_errors_name_the_mismatch() -> None:
    attentions, key_groups, text_mask = random_batch()
    metric = AttentionOverEncoders(["a", "b", "c"], num_layers=2, num_heads=3)
    with pytest.raises(ValueError, match="2 layers, got 1"):
        metric.update(attentions[:1], key_groups, text_mask)
    with pytest.raises(ValueError, match="expected 3 heads, got 2"):
        metric.update([a[:, :2] for a in attentions], key_groups, text_mask)
    with pytest.raises(ValueError, match=r"key_groups of shape \(18,\) for K=18, got \(17,\)"):
        metric.update(attentions, key_groups[:-1], text_mask)
    with pytest.raises(ValueError, match="text_query_mask of shape"):
        metric.update(attentions, key_groups, text_mask[:, :-1])
    with pytest.raises(ValueError, match=r"in \[-2, 2\] for 3 encoders, got \[3\]"):
        metric.update(attentions, torch.where(key_groups == 2, 3, key_groups), text_mask)
    with pytest.raises(ValueError, match="not TEXT"):
        metric.update(attentions, key_groups, text_mask | (key_groups == 0))
    assert int(metric.cls_count) == 0  # nothing was accumulated by the rejected calls
    for reserved in ("text", "cls"):
        with pytest.raises(ValueError, match=repr(reserved)):
            AttentionOverEncoders(["a", reserved], num_layers=1, num_heads=1)


def test_scalar_metrics_and_rows() -> None:
    metric = AttentionOverEncoders(["e0", "e1"], num_layers=1, num_heads=2)
    metric.update(*hand_batch())
    stats = metric.compute()
    scalars = scalar_metrics(stats, metric.group_names)
    assert len(scalars) == 2 * 1 * 4
    # Head means of the hand-computed table.
    assert scalars["attn/cls/layer0/e0"] == pytest.approx(0.4125)
    assert scalars["attn/cls/layer0/cls"] == pytest.approx(0.2125)
    assert scalars["attn/text/layer0/e1"] == pytest.approx(0.425)
    assert scalars["attn/text/layer0/text"] == pytest.approx(0.15)
    assert "val_attn/text/layer0/cls" in scalar_metrics(stats, metric.group_names, prefix="val_attn")

    rows = stats_rows(stats, metric.group_names)
    assert len(rows) == 2 * 1 * 2 * 4
    assert rows[0] == {"query": "cls", "layer": 0, "head": 0, "group": "e0", "mass": pytest.approx(0.2)}
    assert rows[-1] == {"query": "text", "layer": 0, "head": 1, "group": "cls", "mass": pytest.approx(0.05)}
    with pytest.raises(ValueError, match="groups"):
        scalar_metrics(stats, ["e0", "e1", "text"])


def test_save_and_load_round_trip(tmp_path) -> None:
    attentions, key_groups, text_mask = random_batch(layers=3, dropped=2)
    metric = AttentionOverEncoders(["dino", "clip", "siglip"], num_layers=3, num_heads=3)
    metric.update(attentions, key_groups, text_mask)
    stats, groups = metric.compute(), metric.group_names
    out_dir = tmp_path / "epoch_1"
    paths = save_stats(stats, groups, out_dir, extra={"epoch": 1})

    names = {
        "attention.json",
        "attention.csv",
        "attention_cls_layers.png",
        "attention_text_layers.png",
        "attention_cls_heads.png",
        "attention_text_heads.png",
    }
    assert set(paths) == names
    assert {p.name for p in out_dir.iterdir()} == names  # no temp files left behind

    loaded, loaded_groups = load_stats(paths["attention.json"])
    assert loaded_groups == groups
    torch.testing.assert_close(loaded, stats)
    payload = json.loads(paths["attention.json"].read_text())
    assert payload["epoch"] == 1 and payload["num_layers"] == 3 and payload["num_heads"] == 3
    assert "queries" not in payload  # the default query kinds: the file is as before the LM head
    torch.testing.assert_close(load_stats(out_dir)[0], stats)

    with paths["attention.csv"].open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["query", "layer", "head", "group", "mass"]
        rows = list(reader)
    assert len(rows) == len(QUERY_KINDS) * 3 * 3 * 5
    assert {r["group"] for r in rows} == set(groups)
    assert all(float(r["mass"]) == 0 for r in rows if r["group"] == "siglip")

    for name in names - {"attention.json", "attention.csv"}:
        with Image.open(paths[name]) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def test_failed_save_leaves_nothing_behind(tmp_path) -> None:
    stats = torch.full((2, 1, 1, 3), 1 / 3)
    with pytest.raises(TypeError):
        save_stats(stats, ["a", "text", "cls"], tmp_path, extra={"bad": object()})
    with pytest.raises(ValueError, match="overwrite"):
        save_stats(stats, ["a", "text", "cls"], tmp_path, extra={"cls": 1})
    assert list(tmp_path.iterdir()) == []


# ---- the LM head: per-sample groups, left padding, prompt and first-answer queries -------------------------

LM_GROUP_ROWS = [
    [CLS, 0, 1, TEXT, TEXT, ANSWER, ANSWER],  # no padding
    [PAD, PAD, CLS, 0, TEXT, ANSWER, ANSWER],  # left-padded, encoder 1 dropped
    [PAD, CLS, 0, 1, TEXT, TEXT, TEXT],  # no answer tokens
]


def lm_hand_batch() -> tuple[list[torch.Tensor], torch.Tensor]:
    """L=2, H=1, B=3, S=7 over ``LM_GROUP_ROWS``. Layer 0: the rows below; layer 1: every query attends to
    itself only. Rows not counted (BOS, visual, padding, answer tokens after the first) leak their mass: to
    e1 in sample 0, to a padded key in samples 1 and 2 (allowed for queries that are not counted)."""
    groups = torch.tensor(LM_GROUP_ROWS)
    layer0 = torch.zeros(3, 1, 7, 7)
    layer0[0, ..., 2] = 1.0
    layer0[1:, ..., 0] = 1.0
    rows = {
        # (sample, query): probabilities over the 7 keys
        (0, 3): [0.1, 0.3, 0.2, 0.4, 0.0, 0.0, 0.0],  # prompt
        (0, 4): [0.2, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0],  # prompt
        (0, 5): [0.1, 0.1, 0.3, 0.1, 0.1, 0.3, 0.0],  # first answer
        (1, 4): [0.0, 0.0, 0.5, 0.25, 0.25, 0.0, 0.0],  # prompt
        (1, 5): [0.0, 0.0, 0.2, 0.4, 0.2, 0.2, 0.0],  # first answer
        (2, 4): [0.0, 0.4, 0.2, 0.2, 0.2, 0.0, 0.0],  # prompt
        (2, 5): [0.0, 0.1, 0.1, 0.1, 0.2, 0.5, 0.0],  # prompt
        (2, 6): [0.0, 0.1, 0.3, 0.3, 0.1, 0.1, 0.1],  # prompt
    }
    for (b, q), row in rows.items():
        layer0[b, 0, q] = torch.tensor(row)
    layer1 = torch.eye(7).expand(3, 1, 7, 7).clone()
    return [layer0, layer1], groups


# Groups e0, e1, prompt, answer, bos. Prompt: per-sample means [.25, .2, .4, 0, .15], [.25, 0, .25, 0, .5],
# [.2, .2, .4, 0, .2], averaged over the 3 samples; answer: [.1, .3, .2, .3, .1] and [.4, 0, .2, .2, .2] over
# the 2 samples with answer tokens.
LM_PROMPT_0 = [0.7 / 3, 0.4 / 3, 0.35, 0.0, 0.85 / 3]
LM_ANSWER_0 = [0.25, 0.15, 0.2, 0.25, 0.15]


def test_lm_hand_computed_masses() -> None:
    metric = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    assert metric.group_names == ["e0", "e1", "prompt", "answer", "bos"]
    assert metric.query_kinds == LM_QUERY_KINDS == ("prompt", "answer")
    metric.update(*lm_hand_batch())
    stats = metric.compute()
    assert stats.shape == (2, 2, 1, 5) and stats.dtype == torch.float32
    assert int(metric.prompt_count) == 3 and int(metric.answer_count) == 2
    torch.testing.assert_close(stats[0, 0, 0], torch.tensor(LM_PROMPT_0))
    torch.testing.assert_close(stats[1, 0, 0], torch.tensor(LM_ANSWER_0))
    # Layer 1: a query on itself; the first answer token is an "answer" key to itself.
    torch.testing.assert_close(stats[:, 1, 0], torch.tensor([[0.0, 0, 1, 0, 0], [0, 0, 0, 1, 0]]))
    torch.testing.assert_close(stats.sum(-1), torch.ones(2, 2, 1))


def test_lm_mixed_tokens_count_as_the_fused_group() -> None:
    attentions, groups = lm_hand_batch()
    groups = torch.where(groups == 1, MIXED, groups)
    with pytest.raises(ValueError, match=r"except MIXED \(-3\).*got \[-3\]; MIXED \(-3\) tokens need mixed=True"):
        LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1).update(attentions, groups)
    metric = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1, mixed=True)
    assert metric.group_names == ["e0", "e1", "fused", "prompt", "answer", "bos"]
    metric.update(attentions, groups)
    stats = metric.compute()
    # e1's masses of the hand batch move to "fused"; e1 stays at 0.
    p, a = LM_PROMPT_0, LM_ANSWER_0
    torch.testing.assert_close(stats[0, 0, 0], torch.tensor([p[0], 0.0, p[1], *p[2:]]))
    torch.testing.assert_close(stats[1, 0, 0], torch.tensor([a[0], 0.0, a[1], *a[2:]]))


def test_lm_samples_without_answer_count_for_the_prompt_only() -> None:
    attentions, groups = lm_hand_batch()
    no_answer = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    no_answer.update([a[2:] for a in attentions], groups[2:])
    assert int(no_answer.prompt_count) == 1 and int(no_answer.answer_count) == 0
    stats = no_answer.compute()
    torch.testing.assert_close(stats[0, 0, 0], torch.tensor([0.2, 0.2, 0.4, 0.0, 0.2]))
    assert torch.equal(stats[1], torch.zeros(2, 1, 5))  # no sample: zeros
    # Batches accumulate like one batch.
    split = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    split.update([a[:2] for a in attentions], groups[:2])
    split.merge_state(no_answer)  # the sum DDP reduces with
    joint = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    joint.update(attentions, groups)
    torch.testing.assert_close(split.compute(), joint.compute())


def test_lm_bf16_input_and_uncounted_padding_rows() -> None:
    attentions, groups = lm_hand_batch()
    ref = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    ref.update(attentions, groups)
    low = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    low.update([a.to(torch.bfloat16) for a in attentions], groups)
    torch.testing.assert_close(low.compute(), ref.compute(), atol=1e-2, rtol=0)


def test_lm_mass_on_padding_is_an_error() -> None:
    attentions, groups = lm_hand_batch()
    attentions[1][1, 0, 4] = torch.tensor([1e-3, 0.0, 0.0, 0.0, 1 - 1e-3, 0.0, 0.0])  # a prompt query, layer 1
    metric = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    with pytest.raises(ValueError, match="layer 1: a prompt or answer query gives padded keys .* up to 0.001"):
        metric.update(attentions, groups)
    assert int(metric.prompt_count) == 0 and torch.equal(metric.prompt_sum, torch.zeros(2, 1, 5, dtype=torch.float64))
    attentions[1][1, 0, 4] = torch.tensor([1e-7, 0.0, 0.0, 0.0, 1 - 1e-7, 0.0, 0.0])  # within rounding
    metric.update(attentions, groups)
    assert int(metric.prompt_count) == 3


def test_lm_validation_errors_and_reserved_names() -> None:
    attentions, groups = lm_hand_batch()
    metric = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    with pytest.raises(ValueError, match="2 layers, got 1"):
        metric.update(attentions[:1], groups)
    with pytest.raises(ValueError, match="expected 1 heads, got 2"):
        metric.update([a.repeat(1, 2, 1, 1) for a in attentions], groups)
    with pytest.raises(ValueError, match=r"groups of shape \(3, 7\) for B=3, S=7, got \(7,\)"):
        metric.update(attentions, groups[0])
    for bad in (2, PAD - 1):
        with pytest.raises(ValueError, match=rf"in \[-5, 1\].*got \[{bad}\]"):
            metric.update(attentions, torch.where(groups == 1, bad, groups))
    assert int(metric.prompt_count) == 0
    for reserved in ("prompt", "answer", "bos", "text", "cls", "fused"):
        with pytest.raises(ValueError, match=repr(reserved)):
            LMAttentionOverEncoders(["a", reserved], num_layers=1, num_heads=1)


def test_lm_query_kinds_through_scalars_rows_and_files(tmp_path) -> None:
    metric = LMAttentionOverEncoders(["e0", "e1"], num_layers=2, num_heads=1)
    metric.update(*lm_hand_batch())
    stats, groups, queries = metric.compute(), metric.group_names, metric.query_kinds

    scalars = scalar_metrics(stats, groups, prefix="attn", query_kinds=queries)
    assert len(scalars) == 2 * 2 * 5
    assert scalars["attn/prompt/layer0/bos"] == pytest.approx(0.85 / 3)
    assert scalars["attn/answer/layer0/answer"] == pytest.approx(0.25)
    assert scalars["attn/answer/layer1/answer"] == pytest.approx(1.0)
    rows = stats_rows(stats, groups, query_kinds=queries)
    assert rows[0] == {"query": "prompt", "layer": 0, "head": 0, "group": "e0", "mass": pytest.approx(0.7 / 3)}
    assert rows[-1] == {"query": "answer", "layer": 1, "head": 0, "group": "bos", "mass": 0.0}
    with pytest.raises(ValueError, match=r"query kinds \['prompt'\]"):
        scalar_metrics(stats, groups, query_kinds=("prompt",))
    with pytest.raises(ValueError, match="unique"):
        stats_rows(stats, groups, query_kinds=("prompt", "prompt"))
    with pytest.raises(ValueError, match=r"\['groups'\] would overwrite"):
        stats_rows(stats, groups, query_kinds=("prompt", "groups"))

    paths = save_stats(stats, groups, tmp_path, extra={"epoch": 0}, query_kinds=queries)
    assert set(paths) == {"attention.json", "attention.csv"} | {
        f"attention_{q}_{k}.png" for q in ("prompt", "answer") for k in ("layers", "heads")
    }
    payload = json.loads(paths["attention.json"].read_text())
    assert list(payload)[:6] == ["groups", "queries", "num_layers", "num_heads", "prompt", "answer"]
    assert payload["queries"] == ["prompt", "answer"] and payload["epoch"] == 0
    loaded, loaded_groups = load_stats(tmp_path, query_kinds=LM_QUERY_KINDS)
    torch.testing.assert_close(loaded, stats)
    assert loaded_groups == groups
    with pytest.raises(ValueError, match=r"holds the query kinds \['prompt', 'answer'\], not \['cls', 'text'\]"):
        load_stats(tmp_path)
    with paths["attention.csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["query"] for r in csv_rows] == ["prompt"] * 10 + ["answer"] * 10
    for name in paths:
        if name.endswith(".png"):
            with Image.open(paths[name]) as image:
                image.verify()


def test_a_file_without_query_kinds_holds_cls_and_text(tmp_path) -> None:
    # attention.json as written before the LM head: no "queries".
    stats = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3) / 10
    payload = {"groups": ["a", "text", "cls"], "num_layers": 1, "num_heads": 2, "cls": stats[0].tolist(),
               "text": stats[1].tolist(), "split": "val", "epoch": 4}
    (tmp_path / "attention.json").write_text(json.dumps(payload, indent=1) + "\n")
    loaded, groups = load_stats(tmp_path)
    torch.testing.assert_close(loaded, stats)
    assert groups == ["a", "text", "cls"]
    torch.testing.assert_close(load_stats(tmp_path, query_kinds=("cls", "text"))[0], stats)
    with pytest.raises(ValueError, match=r"holds the query kinds \['cls', 'text'\], not \['prompt', 'answer'\]"):
        load_stats(tmp_path, query_kinds=LM_QUERY_KINDS)
    # "queries" is the file's own key whatever the query kinds.
    with pytest.raises(ValueError, match="overwrite"):
        save_stats(stats, ["a", "text", "cls"], tmp_path / "new", extra={"queries": ["x"]})
    assert not (tmp_path / "new").exists()
