"""Retrieval with the LM head (``+experiment=flickr30k_lm``): the yes/no matching loss, re-ranking by the LM's
log p(yes) - log p(no), checkpoints of trainable weights with the LM's fingerprint, train.py / eval.py end to
end. A tiny Flickr30k in its official format, tiny real encoders, a tiny BERT and tiny random Qwen2 folders."""

from __future__ import annotations

import json
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from lm_helpers import build_tiny_lm
from test_flickr30k import official_recalls, write_flickr30k

from fusion.data.images import load_image
from fusion.data.module import FusionDataModule
from fusion.encoders.text import TextEncoder, build_tiny_bert
from fusion.encoders.vision import TimmEncoder
from fusion.metrics.ranking import pessimistic_rank
from fusion.model.lm import LMHead
from fusion.model.transformer import FusionModel
from fusion.monitoring.attention_stats import LMAttentionOverEncoders
from fusion.retrieval.lm_module import RetrievalLMLitModule
from fusion.retrieval.module import Gallery
from fusion.tasks.flickr30k import Flickr30kTask

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32, "patch_size": 16}
TEMPLATE = "Does the caption match the image? Caption: {question} Answer:"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_lm")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    text = TextEncoder(build_tiny_bert(root / "bert"), model_kwargs=no_dropout)
    task = Flickr30kTask(write_flickr30k(root / "f30k", {"train": 4, "test": 3}))
    lms = {"qwen2": build_tiny_lm(root / "qwen2", "qwen2"), "other": build_tiny_lm(root / "other", "qwen2", seed=7)}
    return {"text": text, "task": task, "lm": lms, "root": root}


def _module(parts, lm: str = "qwen2", regime: str = "lora", **kwargs) -> RetrievalLMLitModule:
    torch.manual_seed(0)
    encoders = {
        "a": TimmEncoder("a", "vit_base_patch16_clip_224.openai", init_seed=0, model_kwargs=TINY),
        "b": TimmEncoder("b", "vit_base_patch16_224.dino", init_seed=1, model_kwargs=TINY),
    }
    fusion = partial(FusionModel, width=16, num_heads=2, dropout=0.0)
    head = partial(LMHead, parts["lm"][lm], regime=regime, lora_rank=4, lora_dropout=0.0, prompt_template=TEMPLATE)
    kwargs = {"embed_dim": 16, "attention_stats": False, **kwargs}
    return RetrievalLMLitModule(encoders, parts["text"], parts["task"], fusion=fusion, head=head, **kwargs)


def _datamodule(module, task, batch_size=4):
    transforms = {n: e.preprocess.transform() for n, e in module.encoders.items()}
    return FusionDataModule(task, transforms, module.text.tokenizer, batch_size=batch_size, num_workers=0)


@pytest.fixture(scope="module")
def train_batch(parts):
    module = _module(parts)
    return next(iter(_datamodule(module, parts["task"], batch_size=8).train_dataloader()))


def test_training_asks_yes_for_positives_and_no_for_hard_negatives(parts, train_batch):
    module = _module(parts, hardest_negatives=True).train()
    seen = {}
    forward = module.head.forward

    def spy(fused, prompts, answers=None, **kwargs):
        seen.update(prompts=list(prompts), answers=list(answers))
        return forward(fused, prompts, answers, **kwargs)

    module.head.forward = spy
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, value)
    module.log_dict = lambda values, **_: logged.update(values)
    loss = module.training_step(train_batch, 0)
    loss.backward()
    B = len(train_batch["questions"])
    # One hard negative caption per image and one image per caption (each image has 5 captions of 8: both exist).
    assert seen["answers"] == ["yes"] * B + ["no"] * (2 * B)
    assert seen["prompts"][:B] == [TEMPLATE.format(question=q) for q in train_batch["questions"]]
    torch.testing.assert_close(loss, module.itc_weight * logged["train/itc"] + module.itm_weight * logged["train/itm"])
    # Both stages learn: the first stage, the fuser, the projector and the LoRA adapters; the LM stays frozen.
    assert module.first_stage.log_scale.grad is not None
    assert module.head.projector[0].weight.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in module.head.lm.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads) and any(g is not None for g in grads.values())
    assert not any(n.startswith("fusion.blocks") for n, _ in module.named_parameters())  # depth 0: tokens only


def test_the_yes_no_loss_falls_on_a_fixed_batch(parts, train_batch):
    # The matching loss alone (the first stage, and so the hardest negatives, stay fixed); a random LM learns
    # in full (with a pretrained one, LoRA is the configured regime).
    module = _module(parts, regime="full", hardest_negatives=True, itc_weight=0.0).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    logged, losses = {}, []
    module.log = lambda *a, **k: None
    module.log_dict = lambda values, **_: logged.update(values)
    for _ in range(6):
        loss = module.training_step(train_batch, 0)
        losses.append(float(logged["train/itm"].detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)) and losses[-1] < 0.8 * losses[0], losses


def _lm_pair_scores(module, task, split="test"):
    """log p(yes) - log p(no) of every (caption, image) pair of the split, each pair on its own, through the LM's
    teacher-forced loss (not the module's re-ranking code)."""
    examples = task.examples(split)
    keys = list(dict.fromkeys(e.image_key for e in examples))
    paths = {e.image_key: e.image_path for e in examples}
    module.eval()
    head = module.head
    with torch.no_grad():
        feats = {}
        for name, enc in module.encoders.items():
            tf = enc.preprocess.transform()
            feats[name] = enc(torch.stack([tf(load_image(paths[k])) for k in keys]))
        keep = torch.ones(1, len(feats), dtype=torch.bool)
        no_text = torch.zeros(1, 1, module.text.hidden_size), torch.zeros(1, 1, dtype=torch.bool)
        scores = torch.zeros(len(examples), len(keys))
        for i in range(len(keys)):
            fused, _ = module.fusion.visual_tokens({n: f[i : i + 1] for n, f in feats.items()}, keep, *no_text)
            for t, ex in enumerate(examples):
                prompt = [TEMPLATE.format(question=ex.question)]
                logp = {}
                for word in ("yes", "no"):
                    tokens = len(head.answer_ids([word])[0])  # the word's tokens and EOS
                    logp[word] = -head(fused, prompt, [word]).loss * tokens
                scores[t, i] = logp["yes"] - logp["no"]
    positives = torch.tensor([[e.image_key == k for k in keys] for e in examples])
    return scores, positives, examples, keys


def test_reranking_ranks_by_the_lms_yes_no_log_odds(parts, tmp_path):
    task = parts["task"]
    module = _module(parts, rerank_k=15, rerank_batch_size=8)  # k >= every candidate: every pair re-scored
    with torch.no_grad():  # LoRA starts as the identity: move the adapters so that they count
        for name, p in module.head.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    module.predictions_path = tmp_path / "predictions.json"
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    got = trainer.test(module, datamodule=_datamodule(module, task), verbose=False)[0]
    scores, positives, examples, keys = _lm_pair_scores(module, task)
    expected = {}
    for name, ranks in (("t2i", pessimistic_rank(scores, positives)), ("i2t", pessimistic_rank(scores.T, positives.T))):
        for K in (1, 5, 10):
            expected[f"test/{name}_r{K}"] = float((ranks <= K).float().mean())
    expected["test/rsum"] = sum(expected.values())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # The rankings file orders every caption's images, and every image's captions, by those scores.
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    names = [task.image_name(k) for k in keys]
    for t, row in enumerate(predictions["text_to_image"]):
        assert row["caption_id"] == examples[t].question_id
        assert row["images"] == [names[i] for i in scores[t].argsort(descending=True).tolist()]
    for i, row in enumerate(predictions["image_to_text"]):
        order = scores[:, i].argsort(descending=True)[:10].tolist()
        assert row["captions"] == [examples[t].question_id for t in order]
    assert official_recalls(tmp_path / "predictions.json", task.annotations, "test") == pytest.approx(
        {k.removeprefix("test/"): v for k, v in expected.items()}
    )


def test_evaluation_steps_feed_the_lms_attention_statistics_with_matching_pairs(parts, train_batch):
    module = _module(parts, attention_stats=True).eval()
    module.start_eval("val")
    with torch.no_grad():
        out = module.eval_step(train_batch, "val")
    lm, fused = out["lm"], out["fused"]
    assert fused.tokens.shape[0] == len(train_batch["questions"])
    layers, heads = module.lm_attention_shape
    assert len(lm.attentions) == layers and lm.attentions[0].shape[1] == heads
    stats = LMAttentionOverEncoders(module.encoder_names, *module.lm_attention_shape, mixed=False)
    stats.update(lm.attentions, lm.inputs.groups)  # what AttentionStatsCallback does with the step's output
    assert torch.isfinite(stats.compute()).all()
    # The teacher-forced answer of a matching pair is the match word ("yes" and EOS).
    labels = lm.inputs.labels[0][lm.inputs.labels[0] >= 0].tolist()
    assert labels == module.head.answer_ids(["yes"])[0]
    gallery = module._galleries["val"]
    assert gallery.captions == train_batch["questions"] and gallery.caption_ids == train_batch["question_ids"]


def test_merged_galleries_keep_each_captions_text(parts):
    def gallery(captions):
        g = Gallery()
        keys = list(dict.fromkeys(k for _, k in captions))
        g.add_images(keys, {"a": torch.zeros(len(keys), 1, 1)}, torch.ones(len(keys), 2))
        ids = [c for c, _ in captions]
        mask = torch.ones(len(ids), 1, dtype=torch.bool)
        g.add_texts(ids, [k for _, k in captions], torch.zeros(len(ids), 1, 1), mask, torch.ones(len(ids), 2),
                    [f"text of {c}" for c in ids])
        return g

    merged = Gallery.merge([gallery([("c1", "k1"), ("c2", "k2")]), gallery([("c3", "k3"), ("c1", "k1")])])
    assert merged.captions == [f"text of {c}" for c in merged.caption_ids] and merged.caption_ids == ["c1", "c2", "c3"]
    with pytest.raises(ValueError, match="texts of all its captions or of none"):
        merged.add_texts(["c4"], ["k1"], torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 2))
    with pytest.raises(ValueError, match="gallery holds 0 texts for 3 captions"):
        _module(parts).pair_scorer({}, torch.zeros(3, 1, 1), torch.ones(3, 1), [])


def test_checkpoint_holds_trainable_weights_and_the_lm_fingerprint(parts, train_batch):
    module = _module(parts)
    with torch.no_grad():
        module.head.projector[0].weight.add_(0.5)
        module.first_stage.log_scale.add_(0.5)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    state = ckpt["state_dict"]
    lm_keys = [k for k in state if k.startswith("head.lm.")]
    assert lm_keys and all("lora_" in k for k in lm_keys)  # the adapters, not the frozen LM
    assert any(k.startswith("head.projector.") for k in state) and "first_stage.log_scale" in state
    assert not any(k.startswith("encoders.") for k in state)
    assert ckpt["lm_fingerprint"] == module.head.lm_fingerprint() and ckpt["lm_regime"] == "lora"

    fresh = _module(parts)
    restored = {**ckpt, "state_dict": dict(state)}
    fresh.on_load_checkpoint(restored)
    fresh.load_state_dict(restored["state_dict"])  # strict: the frozen LM's weights were filled back in
    torch.testing.assert_close(fresh.first_stage.log_scale, module.first_stage.log_scale)
    fused = module.eval().pair_tokens(
        module.encode_images(train_batch), torch.arange(2), torch.zeros(2, 1, module.text.hidden_size),
        torch.ones(2, 1), torch.arange(2),
    )
    prompts = module.match_prompts(train_batch["questions"], torch.arange(2))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().match_scores(fused, prompts), module.match_scores(fused, prompts))

    with pytest.raises(ValueError, match=r"language model differs .*weights_sha256"):
        _module(parts, "other").on_load_checkpoint({**ckpt, "state_dict": dict(state)})
    with pytest.raises(ValueError, match="no LM fingerprint"):
        fresh.on_load_checkpoint({"state_dict": dict(state)})


# ---- end to end: train.py and eval.py as a user runs them ------------------------------------------------
def test_flickr30k_lm_trains_and_evaluates_through_the_entry_points(parts, tmp_path):
    from entrypoints import FAST, train_then_eval

    root = write_flickr30k(tmp_path / "f30k")
    lm = parts["lm"]["qwen2"]
    args = ["+experiment=flickr30k_lm", f"task.root={root}", *FAST, f"training.head.lm_name_or_path={lm}",
            "training.head.gradient_checkpointing=false", "training.head.lora_rank=4", "training.embed_dim=16",
            "training.rerank_k=3", "training.rerank_batch_size=16"]
    done = train_then_eval(args, "test", tmp_path)
    ckpt = torch.load(done.run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lm_regime"] == "lora" and ckpt["lm_fingerprint"]["name_or_path"] == str(lm)
    assert all("lora_" in k for k in ckpt["state_dict"] if k.startswith("head.lm."))
    assert ckpt["hyper_parameters"]["answer_words"] == {"match": "yes", "no_match": "no"}
    metrics = done.eval_metrics
    recalls = ("rsum", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
    assert set(metrics) == {f"test/{p}{k}" for k in recalls for p in ("", "first_")}
    assert done.train_metrics["test/rsum"] == pytest.approx(metrics["test/rsum"])  # the same checkpoint
    # The official rankings file, scored by the standard protocol, gives the logged recalls.
    official = official_recalls(done.out / "predictions.json", root / "dataset_flickr30k.json", "test")
    assert {k: metrics[f"test/{k}"] for k in official} == pytest.approx(official)
