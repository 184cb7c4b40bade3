"""The LM-head LightningModule: training regimes, VE-dropout as token removal, answers scored by the task's
metric (generation and rank classification), checkpoints of trainable weights with the LM's fingerprint,
cached features. Tiny real encoders, a tiny BERT and tiny random Llama / GPT-2 folders loaded by
``from_pretrained``."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lm_helpers import build_tiny_lm

from fusion.data.module import FusionDataModule
from fusion.encoders.text import TextEncoder, build_tiny_bert
from fusion.encoders.vision import TimmEncoder
from fusion.fusers import GatedFuser
from fusion.model.lm import LMHead
from fusion.model.transformer import FusionModel
from fusion.tasks.shapes import ShapesTask
from fusion.training.lm_module import LMLitModule

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 16}


def _encoders(seed_b: int = 1) -> dict:
    return {
        "a": TimmEncoder("a", "vit_base_patch16_clip_224.openai", init_seed=0, model_kwargs=TINY),
        "b": TimmEncoder("b", "vit_base_patch16_224.dino", init_seed=seed_b, model_kwargs=TINY),
    }


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_module")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    text = TextEncoder(build_tiny_bert(root / "bert"), model_kwargs=no_dropout)
    task = ShapesTask(root / "data", num_train=6, num_val=4, num_test=2)
    task.prepare_data()
    lms = {arch: build_tiny_lm(root / arch, arch) for arch in ("llama", "gpt2")}
    lms["other"] = build_tiny_lm(root / "other", "llama", seed=7)
    return {"text": text, "task": task, "lm": lms, "root": root}


def _module(parts, arch: str = "llama", regime: str = "projector", fuser=None, seed_b: int = 1, **kwargs):
    torch.manual_seed(0)
    extra = {"fuser": fuser} if fuser is not None else {}
    fusion = partial(FusionModel, width=16, depth=2, num_heads=2, dropout=0.0, **extra)
    head = partial(LMHead, parts["lm"][arch], regime=regime, lora_rank=4, lora_dropout=0.0)
    return LMLitModule(
        _encoders(seed_b), parts["text"], parts["task"], fusion=fusion, head=head, **kwargs
    )


def _batch(parts, n: int = 3):
    """The first ``n`` validation examples of the shapes task, collated as the data module does."""
    task, text = parts["task"], parts["text"]
    transforms = {name: enc.preprocess.transform() for name, enc in _encoders().items()}
    dm = FusionDataModule(task, transforms, text.tokenizer, batch_size=n, num_workers=0)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def _train_steps(module: LMLitModule, batch: dict, steps: int) -> list[float]:
    """``steps`` AdamW steps of ``module`` on one batch; the loss before each."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = module.training_step(batch, 0)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses


def test_projector_regime_trains_the_projector_and_fuser_not_the_lm(parts):
    module = _module(parts).train()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert any(n.startswith("head.projector.") for n in trainable)
    assert any(n.startswith("fusion.fuser.") for n in trainable)
    assert not any(n.startswith("head.lm.") for n in trainable)
    # Unused by the LM: [CLS], the final norm, the text projection (token_concat ignores the text).
    assert not any(n.startswith(("fusion.cls_token", "fusion.norm", "fusion.text_proj")) for n in trainable)
    assert not any(n.startswith("fusion.blocks") for n, _ in module.named_parameters())
    batch = _batch(parts)
    lm_before = {k: v.clone() for k, v in module.head.lm.state_dict().items()}
    losses = _train_steps(module, batch, 8)
    assert losses[-1] < losses[0]
    for key, value in module.head.lm.state_dict().items():
        torch.testing.assert_close(value, lm_before[key], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_regime_trains_adapters_only(parts, arch):
    module = _module(parts, arch, regime="lora").train()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad and n.startswith("head.lm.")]
    assert trainable and all("lora_" in n for n in trainable)
    batch = _batch(parts)
    losses = _train_steps(module, batch, 6)
    assert losses[-1] < losses[0]


def test_a_dropped_encoder_changes_the_answer_only_through_its_tokens(parts):
    batch = _batch(parts)
    noisy = dict(batch, images=dict(batch["images"], b=torch.randn_like(batch["images"]["b"]) * 5))
    dropped = _module(parts, drop_encoders=["b"]).eval()
    with torch.no_grad():
        out, fused = dropped(batch)
        out_noisy, _ = dropped(noisy)
    torch.testing.assert_close(out.loss, out_noisy.loss, rtol=0, atol=1e-6)
    # Removed, not zeroed: no position of encoder b in the LM's input.
    assert not (out.inputs.groups == 1).any() and (out.inputs.groups == 0).any()
    full = _module(parts).eval()
    with torch.no_grad():
        assert not torch.allclose(full(batch)[0].loss, full(noisy)[0].loss, atol=1e-4)
    assert dropped.head.generate(fused, dropped.prompts(batch), 3) == dropped.head.generate(
        dropped.fused_tokens(noisy), dropped.prompts(noisy), 3
    )


def test_ve_dropout_removes_tokens_per_sample_in_training(parts):
    module = _module(parts, ve_dropout=0.5).train()
    batch = _batch(parts, n=4)
    torch.manual_seed(1)
    out, fused = module(batch)
    visible = fused.visible.sum(1)
    real = out.inputs.attention_mask.sum(1)
    # Each sample's sequence is its visible visual tokens + the same text as without dropout.
    module.eval()
    with torch.no_grad():
        full_out, full = module(batch)
    torch.testing.assert_close(full_out.inputs.attention_mask.sum(1) - real, full.visible.sum(1) - visible)
    assert bool((visible < full.visible.sum(1)).any())


def test_gated_fuser_reads_the_text_and_its_projection_trains(parts):
    module = _module(parts, fuser=GatedFuser).train()
    assert module.fusion.text_proj[1].weight.requires_grad
    loss = module.training_step(_batch(parts), 0)
    loss.backward()
    assert module.fusion.text_proj[1].weight.grad is not None


def test_open_ended_answers_are_generated_and_scored_as_strings(parts):
    module = _module(parts).eval()
    batch = _batch(parts)
    metric = module.task.metric()
    module.predictions_path = parts["root"] / "predictions.json"
    with torch.no_grad():
        fused = module.fused_tokens(batch)
        module.answer(batch, fused, metric)
        texts = module.head.generate(fused, module.prompts(batch), module.max_new_tokens)
    rows = module._prediction_rows
    assert [r["answer"] for r in rows] == texts
    expected = sum(t == module.task.answers[i] for t, i in zip(texts, batch["labels"].tolist(), strict=True))
    assert float(metric.compute()[""]) == pytest.approx(expected / len(texts))


def test_closed_set_answers_rank_the_tasks_answers_by_likelihood(parts, monkeypatch):
    module = _module(parts).eval()
    monkeypatch.setattr(module.task, "open_ended", False)  # rank the shapes answers instead of generating
    batch = _batch(parts)
    metric = module.task.metric()
    with torch.no_grad():
        fused = module.fused_tokens(batch)
        module.answer(batch, fused, metric)
        scores = module.head.rank_candidates(fused, module.prompts(batch), module.task.answers)
    assert scores.shape == (3, module.task.num_classes)
    hits = (scores.argmax(-1) == batch["labels"]).float().mean()
    assert float(metric.compute()[""]) == pytest.approx(float(hits))
    # The best-ranked answer's log-likelihood is the teacher-forced loss of that answer.
    best = scores.argmax(-1)
    one = {k: (v[:1] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
    one["images"] = {n: x[:1] for n, x in batch["images"].items()}
    one["labels"] = best[:1]
    with torch.no_grad():
        out, _ = module(one)
    n_tokens = len(module.head.answer_ids([module.task.answers[int(best[0])]])[0])
    torch.testing.assert_close(-out.loss * n_tokens, scores[0, best[0]], rtol=1e-4, atol=1e-4)


def test_checkpoint_holds_trainable_weights_and_the_lm_fingerprint(parts):
    module = _module(parts)
    with torch.no_grad():
        module.head.projector[0].weight.add_(0.5)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    state = ckpt["state_dict"]
    assert not any(k.startswith("head.lm.") for k in state)
    assert any(k.startswith("head.projector.") for k in state)
    assert ckpt["lm_fingerprint"]["weights_sha256"] == module.head.lm_fingerprint()["weights_sha256"]

    fresh = _module(parts)
    restored = {**ckpt, "state_dict": dict(state)}
    fresh.on_load_checkpoint(restored)
    fresh.load_state_dict(restored["state_dict"])  # strict: the frozen LM's weights were filled back in
    batch = _batch(parts)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(batch)[0].loss, module.eval()(batch)[0].loss)

    other = _module(parts, "other")
    with pytest.raises(ValueError, match=r"language model differs .*weights_sha256"):
        other.on_load_checkpoint({**ckpt, "state_dict": dict(state)})
    lora = _module(parts, regime="lora")
    with pytest.raises(ValueError, match=r"regime='projector'"):
        lora.on_load_checkpoint({**ckpt, "state_dict": dict(state)})


def test_full_regime_checkpoints_keep_the_lm(parts):
    module = _module(parts, regime="full")
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert any(k.startswith("head.lm.") for k in ckpt["state_dict"])


def test_cached_features_give_the_lm_head_the_same_loss(parts, tmp_path):
    from fusion.data.cache.settings import CacheSettings

    encoders = _encoders()
    module = _module(parts).eval()
    transforms = {n: e.preprocess.transform() for n, e in encoders.items()}
    text, task = parts["text"], parts["task"]
    online = FusionDataModule(task, transforms, text.tokenizer, batch_size=4, num_workers=0)
    cached = FusionDataModule(
        task, transforms, text.tokenizer, batch_size=4, num_workers=0, encoders=encoders,
        cache=CacheSettings(tmp_path / "cache", dtype="float32", num_workers=0),
    )
    for dm in (online, cached):
        dm.prepare_data()
        dm.setup("fit")
    plain, from_cache = next(iter(online.val_dataloader())), next(iter(cached.val_dataloader()))
    assert from_cache["images"] == {} and set(from_cache["features"]) == {"a", "b"}
    with torch.no_grad():
        torch.testing.assert_close(module(from_cache)[0].loss, module(plain)[0].loss, atol=1e-5, rtol=0)


def test_bad_options_are_refused_naming_the_key(parts):
    with pytest.raises(ValueError, match="max_new_tokens"):
        _module(parts, max_new_tokens=0)
    with pytest.raises(ValueError, match="candidate_reduction"):
        _module(parts, candidate_reduction="max")
    torch.manual_seed(0)
    head = partial(LMHead, parts["lm"]["llama"], prompt_template="Context: {caption} Q: {question}")
    with pytest.raises(ValueError, match=r"prompt_template .*\['caption'\]"):
        LMLitModule(_encoders(), parts["text"], parts["task"], fusion=partial(FusionModel, width=16), head=head)


# ---- end to end: train.py and eval.py as a user runs them ------------------------------------------------
LM_FAST = [
    "+experiment=shapes_lm", "encoder=[clip_tiny,dino_tiny]", "logger=csv", "data.num_workers=0", "data.batch_size=4",
    "fusion.width=32", "task.num_train=4", "task.num_val=4", "task.num_test=4", "+trainer.num_sanity_val_steps=0",
    "+trainer.limit_train_batches=2", "training.head.lm_name_or_path.hidden_size=32",
]


@pytest.fixture(scope="module")
def trained_lm(tmp_path_factory):
    """One epoch of ``train.py +experiment=shapes_lm`` (tiny sizes) in bf16 mixed precision (the precision of
    trainer=gpu; CPU autocast here), then ``eval.py`` of its checkpoint on test with the prediction file; shared
    by the end-to-end tests."""
    from entrypoints import train_then_eval

    tmp = tmp_path_factory.mktemp("shapes_lm")
    return train_then_eval([*LM_FAST, "trainer.precision=bf16-mixed"], "test", tmp)


def test_shapes_lm_trains_and_evaluates_through_the_entry_points(trained_lm):
    import json

    metrics = trained_lm.train_metrics
    for key in ("val/acc", "val/loss", "test/acc", "test/acc_color", "val/majority_acc"):
        assert key in metrics, key
    ckpt = torch.load(trained_lm.run / "checkpoints" / "last.ckpt", weights_only=True)
    assert "lm_fingerprint" in ckpt and ckpt["lm_regime"] == "full"
    assert "bf16" in (trained_lm.run / "config_resolved.yaml").read_text()
    # The tiny LM was written under the data folder on first use and loaded by from_pretrained.
    assert (trained_lm.run.parent / "data" / "lm" / "tiny-llama-shapes" / "config.json").is_file()
    # eval.py reproduces the test metrics of the same checkpoint and writes the official prediction file.
    assert trained_lm.eval_metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    rows = json.loads((trained_lm.out / "predictions.json").read_text())
    assert len(rows) == 12 and all(set(r) == {"question_id", "answer"} for r in rows)
    answers = {r["question_id"]: r["answer"] for r in rows}
    task = ShapesTask(trained_lm.run.parent / "data", num_train=4, num_val=4, num_test=4)
    hits = [answers[e.question_id] == task.answers[e.label] for e in task.examples("test")]
    assert metrics["test/acc"] == pytest.approx(sum(hits) / len(hits))


def test_shapes_lm_writes_attention_over_encoders_from_the_lm(trained_lm):
    from fusion.monitoring.attention_stats import LM_QUERY_KINDS, load_stats

    stats, groups = load_stats(trained_lm.out / "attention" / "test" / "attention.json", query_kinds=LM_QUERY_KINDS)
    assert groups == ["clip_tiny", "dino_tiny", "prompt", "answer", "bos"]
    assert stats.shape == (2, 2, 4, 5)  # (query kinds, the tiny LM's 2 layers, 4 heads, groups)
    torch.testing.assert_close(stats.sum(-1), torch.ones(2, 2, 4), atol=1e-4, rtol=0)
    assert (trained_lm.out / "attention" / "test" / "attention_prompt_heads.png").is_file()
    # The logger gets one scalar per (query kind, layer, group), as with today's head.
    (csv_file,) = (trained_lm.out / "csv").rglob("metrics.csv")
    columns = csv_file.read_text().splitlines()[0].split(",")
    assert {"test/attn/prompt/layer0/clip_tiny", "test/attn/answer/layer1/dino_tiny"} <= set(columns)


def test_answer_words_are_what_the_lm_is_trained_on_and_ranks(parts, monkeypatch):
    task = parts["task"]
    with pytest.raises(ValueError, match="closed-set tasks"):
        _module(parts, answer_words={"red": "crimson"})
    monkeypatch.setattr(task, "open_ended", False)
    module = _module(parts, answer_words={"red": "crimson", "square": "box"}).eval()
    said = dict(zip(task.answers, module.answer_words, strict=True))
    assert said["red"] == "crimson" and said["square"] == "box" and said["blue"] == "blue"
    batch = _batch(parts)
    assert module.answer_strings(batch) == [said[task.answers[i]] for i in batch["labels"].tolist()]
    with torch.no_grad():
        fused = module.fused_tokens(batch)
        expected = module.head.rank_candidates(fused, module.prompts(batch), module.answer_words)
        metric = task.metric()
        module.answer(batch, fused, metric)
    hits = (expected.argmax(-1) == batch["labels"]).float().mean()
    assert float(metric.compute()[""]) == pytest.approx(float(hits))
    with pytest.raises(ValueError, match=r"names \['purple-ish'\]"):
        _module(parts, answer_words={"purple-ish": "x"})
    with pytest.raises(ValueError, match="the same word"):
        _module(parts, answer_words={"red": "blue"})


@pytest.mark.slow
def test_the_subset_sweep_and_its_study_run_with_the_lm_head_by_one_override(tmp_path):
    """``+experiment=shapes_subsets training=lm_shapes`` (two subsets, one seed, tiny sizes), then the study."""
    import json
    import subprocess
    import sys

    from entrypoints import ROOT, run

    logs = tmp_path / "logs"
    small = [arg for arg in LM_FAST if arg not in ("+experiment=shapes_lm", "encoder=[clip_tiny,dino_tiny]")]
    sweep_args = ["+experiment=shapes_subsets", "training=lm_shapes", "encoder=[clip_tiny],[clip_tiny,dino_tiny]"]
    proc = run("train.py", [*sweep_args, f"paths.log_dir={logs}", "trainer.max_epochs=1", *small], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (sweep,) = logs.glob("train/multiruns/*")
    study = subprocess.run([sys.executable, "-m", "fusion.study", str(sweep)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert study.returncode == 0, study.stderr[-4000:]
    jobs = (sweep / "jobs.csv").read_text().splitlines()
    assert len(jobs) == 3 and all(",LMHead," in row for row in jobs[1:])
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["leaning"]["encoders"] == ["clip_tiny", "dino_tiny"]
    for name in ("study.md", "agreement.csv", "leaning.csv", "effective_rank.csv", "retrain_vs_mask.png"):
        assert (sweep / name).is_file(), name


def test_an_lm_head_run_resumes_from_its_checkpoint(trained_lm, tmp_path):
    """train.py ckpt_path=<last.ckpt> continues an LM-head run: the frozen LM's weights, left out of the
    checkpoint, are not counted as missing (fusion.training.resume.check_compatible)."""
    from entrypoints import run

    ckpt = trained_lm.run / "checkpoints" / "last.ckpt"
    resumed = tmp_path / "resumed"
    proc = run("train.py", [*LM_FAST, "trainer.precision=bf16-mixed", "trainer.max_epochs=2", f"ckpt_path={ckpt}",
                            f"hydra.run.dir={resumed}", "test=false"], trained_lm.run.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["epoch"] == 1 and state["global_step"] == 4  # two batches per epoch: the second epoch ran


@pytest.mark.parametrize("fuser", ["TokenConcatFuser", "ChannelConcatFuser", "ResamplerFuser", "GatedFuser"])
def test_every_fuser_feeds_the_lm(parts, fuser):
    import fusion.fusers as fusers

    module = _module(parts, fuser=getattr(fusers, fuser)).train()
    batch = _batch(parts)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert module.fusion.fuser.token_encoder.numel() > 0
    assert any(p.grad is not None for p in module.fusion.fuser.parameters())
    module.eval()
    with torch.no_grad():
        out, fused = module(batch)
    mixed = fuser != "TokenConcatFuser"
    assert bool((fused.token_encoder < 0).any()) == mixed  # mixing fusers' tokens belong to no single encoder


def test_two_images_per_example_keep_their_image_index_embedding(parts, monkeypatch):
    """NLVR2's layout: each image fused on its own, its tokens tagged with the image-index embedding, both
    images' tokens before the prompt."""
    batch = _batch(parts)
    monkeypatch.setattr(type(parts["task"]), "images_per_example", 2)
    module = _module(parts).train()
    batch["images"] = {n: torch.stack([x, x.flip(-1)], 1) for n, x in batch["images"].items()}
    fused = module.fused_tokens(batch)
    per_image = module.fusion.fuser.token_encoder.numel()
    assert fused.tokens.shape[1] == 2 * per_image
    loss = module.training_step(batch, 0)
    loss.backward()
    assert module.fusion.image_embed.grad is not None and module.fusion.image_embed.grad.abs().sum() > 0
