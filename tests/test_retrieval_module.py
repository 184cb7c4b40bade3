"""The retrieval LightningModule: training step, and re-ranking with k >= candidates = exhaustive ITM scoring."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from test_flickr30k import write_flickr30k

from fusion.data.images import load_image
from fusion.data.module import FusionDataModule
from fusion.encoders.text import TextEncoder, build_tiny_bert
from fusion.encoders.vision import TimmEncoder
from fusion.metrics.ranking import pessimistic_rank
from fusion.model.heads import ClassifierHead
from fusion.model.transformer import FusionModel
from fusion.retrieval.module import Gallery, RetrievalLitModule
from fusion.tasks.flickr30k import Flickr30kTask
from fusion.tasks.shapes import ShapesTask

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32, "patch_size": 16}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    text = TextEncoder(build_tiny_bert(root / "bert"), model_kwargs=no_dropout)
    task = Flickr30kTask(write_flickr30k(root / "f30k", {"train": 4, "test": 4}))
    return text, task


def _module(text, task, **kwargs):
    torch.manual_seed(0)
    encoders = {
        "a": TimmEncoder("a", "vit_base_patch16_clip_224.openai", init_seed=0, model_kwargs=TINY),
        "b": TimmEncoder("b", "vit_base_patch16_224.dino", init_seed=1, model_kwargs=TINY),
    }

    def fusion(**dims):
        return FusionModel(**dims, width=32, depth=1, num_heads=2, dropout=0.0)

    def head(width, num_classes):
        return ClassifierHead(width, num_classes, dropout=0.0)

    return RetrievalLitModule(encoders, text, task, fusion=fusion, head=head, attention_stats=False, **kwargs)


def _datamodule(module, task, batch_size=3):
    transforms = {n: e.preprocess.transform() for n, e in module.encoders.items()}
    return FusionDataModule(task, transforms, module.text.tokenizer, batch_size=batch_size, num_workers=0)


def test_training_step_trains_both_stages(parts):
    text, task = parts
    module = _module(text, task).train()
    batch = next(iter(_datamodule(module, task, batch_size=8).train_dataloader()))
    module.log = module.log_dict = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert module.first_stage.text_proj[1].weight.grad is not None
    assert module.first_stage.log_scale.grad is not None
    assert module.head.net[-1].weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in module.encoders.parameters())


def _exhaustive_recalls(module, task, split="test"):
    """Score every (caption, image) pair on its own, by a path independent of the evaluation loop."""
    examples = task.examples(split)
    keys = list(dict.fromkeys(e.image_key for e in examples))
    paths = {e.image_key: e.image_path for e in examples}
    module.eval()
    with torch.no_grad():
        feats = {}
        for name, enc in module.encoders.items():
            tf = enc.preprocess.transform()
            feats[name] = enc(torch.stack([tf(load_image(paths[k])) for k in keys]))
        scores = torch.zeros(len(examples), len(keys))
        for t, ex in enumerate(examples):
            tok = module.text.tokenize([ex.question])
            states = module.text(tok["input_ids"], tok["attention_mask"])
            for i in range(len(keys)):
                one = torch.tensor([i])
                logits, _ = module.itm_logits(feats, one, states, tok["attention_mask"], torch.tensor([0]))
                scores[t, i] = logits[0, 1] - logits[0, 0]
    positives = torch.tensor([[e.image_key == k for k in keys] for e in examples])
    t2i, i2t = pessimistic_rank(scores, positives), pessimistic_rank(scores.T, positives.T)
    out = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for K in (1, 5, 10):
            out[f"test/{name}_r{K}"] = float((ranks <= K).float().mean())
    out["test/rsum"] = sum(out.values())
    return out


def _test_metrics(module, task):
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.test(module, datamodule=_datamodule(module, task), verbose=False)[0]


def test_rerank_k_at_least_the_candidate_count_equals_exhaustive_itm_scoring(parts):
    text, task = parts
    module = _module(text, task, rerank_k=20, rerank_batch_size=7)
    got = _test_metrics(module, task)
    expected = _exhaustive_recalls(module, task)
    assert set(got) == set(expected) | {k.replace("test/", "test/first_") for k in expected}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_module_refuses_a_classification_task(parts, tmp_path):
    text, _ = parts
    with pytest.raises(ValueError, match="2-class matching head, but task 'shapes' has"):
        _module(text, ShapesTask(tmp_path / "shapes", num_train=2, num_val=2, num_test=2))


def test_evaluation_in_two_ddp_processes_equals_one_process(parts):
    text, task = parts
    single = _test_metrics(_module(text, task, rerank_k=20), task)
    module = _module(text, task, rerank_k=20)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    # Each process sees half the captions; the galleries are gathered so both rank the whole split.
    got = trainer.test(module, datamodule=_datamodule(module, task), verbose=False)[0]
    assert set(got) == set(single)
    for key, value in single.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_merged_galleries_hold_each_image_and_caption_once():
    def gallery(keys, captions):
        g = Gallery()
        g.add_images(keys, {"a": torch.tensor([[[float(k[-1])]] for k in keys])}, torch.ones(len(keys), 2))
        ids = [c for c, _ in captions]
        states = torch.tensor([[[float(c[-1])]] for c in ids])
        g.add_texts(ids, [k for _, k in captions], states, torch.ones(len(ids), 1, dtype=torch.bool),
                    torch.ones(len(ids), 2))
        return g

    # The second process got image k1 (another of its captions) and caption c1 too (a padding sampler).
    merged = Gallery.merge([gallery(["k1", "k2"], [("c1", "k1"), ("c2", "k2")]),
                            gallery(["k3", "k1"], [("c3", "k3"), ("c1", "k1")])])
    features, _, states, _, _ = merged.stacked()
    assert merged.image_keys == ["k1", "k2", "k3"] and features["a"].flatten().tolist() == [1.0, 2.0, 3.0]
    assert merged.caption_ids == ["c1", "c2", "c3"] and states.flatten().tolist() == [1.0, 2.0, 3.0]
    assert [merged.image_keys[i] for i in merged.caption_image] == ["k1", "k2", "k3"]


def test_retrieval_and_classification_are_siblings_on_one_base():
    from fusion.training.module import FusionBase, FusionLitModule

    assert issubclass(RetrievalLitModule, FusionBase) and not issubclass(RetrievalLitModule, FusionLitModule)


def test_a_task_without_rankings_is_refused_as_the_module_is_built(parts):
    text, task = parts

    class NoRankings:
        """The Flickr30k task without write_rankings (as a 2-answer classification task would be)."""

        def __getattr__(self, name):
            if name == "write_rankings":
                raise AttributeError(name)
            return getattr(task, name)

    with pytest.raises(TypeError, match=r"has no write_rankings\(\): retrieval needs a ranking task"):
        _module(text, NoRankings())


def test_options_are_checked_once_by_the_base_and_stored_plain(parts):
    from omegaconf import OmegaConf

    text, task = parts
    module = _module(text, task, lr="1e-4", ve_dropout=OmegaConf.create({"a": "0.2"}), embed_dim=16)
    assert module.hparams.lr == 1e-4 and module.hparams.embed_dim == 16
    assert module.hparams.ve_dropout == {"a": 0.2} and type(module.hparams.ve_dropout) is dict
    with pytest.raises(ValueError, match=r"training.weight_decay=-1: expected a number >= 0"):
        _module(text, task, weight_decay=-1)
