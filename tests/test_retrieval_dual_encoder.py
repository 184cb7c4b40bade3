"""The retrieval first stage: embeddings, the contrastive loss, and hard negatives that are never positives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusion.retrieval.dual_encoder import DualEncoder, contrastive_loss, hard_negatives, same_image


def test_same_image_compares_keys():
    same = same_image(["flickr30k/1", "flickr30k/2", "flickr30k/1", "flickr30k/3"])
    assert same.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]


def test_embeddings_are_unit_vectors_and_ignore_dropped_encoders_and_padding():
    torch.manual_seed(0)
    dual = DualEncoder({"a": 8, "b": 12}, text_dim=6, embed_dim=4, encoder_prefix={"a": 1, "b": 0})
    feats = {"a": torch.randn(3, 5, 8), "b": torch.randn(3, 7, 12)}
    keep = torch.tensor([[True, True], [True, False], [False, True]])
    emb = dual.embed_images(feats, keep)
    assert emb.shape == (3, 4) and torch.allclose(emb.norm(dim=-1), torch.ones(3))
    noisy = {"a": feats["a"], "b": torch.randn(3, 7, 12) * 10}
    assert torch.allclose(dual.embed_images(noisy, keep)[1], emb[1])  # row 1 dropped b
    assert not torch.allclose(dual.embed_images(noisy, keep)[0], emb[0])
    # Encoder a is read at its [CLS] (token 0) only; b (no prefix) through the mean of its tokens.
    moved = {"a": torch.cat([feats["a"][:, :1], torch.randn(3, 4, 8)], dim=1), "b": feats["b"]}
    assert torch.allclose(dual.embed_images(moved, keep), emb)

    hidden, mask = torch.randn(2, 4, 6), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    text = dual.embed_text(hidden, mask)
    padded = hidden.clone()
    padded[0, 2:] = 99.0
    assert torch.allclose(dual.embed_text(padded, mask), text) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    assert dual.scale.item() == pytest.approx(1 / 0.07)


def test_contrastive_loss_by_hand_and_with_several_captions_per_image():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    eye = torch.eye(2, dtype=torch.bool)
    t2i = -(F.log_softmax(logits, 1).diagonal()).mean()
    i2t = -(F.log_softmax(logits, 0).diagonal()).mean()
    assert contrastive_loss(logits, eye).item() == pytest.approx(((t2i + i2t) / 2).item())
    # Two captions of one image (rows 0, 1 of three): the targets are uniform over both, so equal scores
    # for the two are the optimum (no gradient), while a one-hot target would push them apart.
    positives = same_image(["k/1", "k/1", "k/2"])
    logits = torch.tensor([[4.0, 4.0, 0.0], [4.0, 4.0, 0.0], [0.0, 0.0, 4.0]], requires_grad=True)
    contrastive_loss(logits, positives).backward()
    assert logits.grad[:2, :2].abs().max() < 0.02
    assert contrastive_loss(torch.zeros(2, 2), eye).item() == pytest.approx(math.log(2))
    one_hot = logits.detach().clone().requires_grad_(True)
    contrastive_loss(one_hot, torch.eye(3, dtype=torch.bool)).backward()
    assert one_hot.grad[0, 1] > 0.1


@pytest.mark.parametrize("hardest", [False, True])
def test_hard_negatives_never_pick_a_caption_or_image_of_the_same_image(hardest):
    torch.manual_seed(0)
    keys = ["k/1", "k/1", "k/2", "k/1", "k/3", "k/2", "k/4", "k/4"]
    positives = same_image(keys)
    for _ in range(50):
        # Positives are the most similar by far: a sampler that ignored the mask would pick them.
        logits = torch.randn(8, 8) + 20 * positives.float()
        neg_image, neg_text = hard_negatives(logits, positives, hardest=hardest)
        assert (neg_image >= 0).all() and (neg_text >= 0).all()
        for i in range(8):
            assert keys[neg_image[i]] != keys[i] and keys[neg_text[i]] != keys[i]


def test_hardest_negative_is_the_most_similar_wrong_one_and_none_without_one():
    logits = torch.tensor([[5.0, 4.0, 1.0], [3.0, 5.0, 2.0], [0.0, 1.0, 5.0]])
    neg_image, neg_text = hard_negatives(logits, torch.eye(3, dtype=torch.bool), hardest=True)
    assert neg_image.tolist() == [1, 0, 1]  # caption rows: best wrong column
    assert neg_text.tolist() == [1, 0, 1]  # image columns: best wrong row
    # All rows one image: there is no wrong pair to draw.
    none_image, none_text = hard_negatives(torch.randn(3, 3), torch.ones(3, 3, dtype=torch.bool))
    assert none_image.tolist() == none_text.tolist() == [-1, -1, -1]


def test_drawn_negatives_follow_the_similarity():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 0.0, 0.0]] + [[0.0] * 4] * 3)
    counts = torch.zeros(4)
    for _ in range(400):
        counts[hard_negatives(logits, torch.eye(4, dtype=torch.bool))[0][0]] += 1
    # softmax over the wrong columns 1..3: e^3 / (e^3 + 2) = 0.91
    assert counts[0] == 0 and 0.85 < counts[1] / 400 < 0.97
