"""The LightningModule's own logic: frozen encoders, VE-dropout at inference, checkpoint hygiene."""

import logging

import pytest
import torch
from torchmetrics import MeanMetric

from fusion.encoders.text import TextEncoder, build_tiny_bert
from fusion.encoders.vision import HFVisionEncoder, TimmEncoder
from fusion.fusers import ResamplerFuser
from fusion.model.heads import ClassifierHead
from fusion.model.transformer import FusionModel
from fusion.monitoring.callbacks import AttentionStatsCallback, FuserWeightsCallback
from fusion.tasks.shapes import ShapesTask
from fusion.training.module import FusionLitModule, annotated_count

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32, "patch_size": 16}


def _encoders(seed_b=1):
    return {
        "a": TimmEncoder("a", "vit_base_patch16_clip_224.openai", init_seed=0, model_kwargs=TINY),
        "b": TimmEncoder("b", "vit_base_patch16_224.dino", init_seed=seed_b, model_kwargs=TINY),
    }


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lit")
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    text = TextEncoder(build_tiny_bert(root / "bert"), model_kwargs=no_dropout)
    task = ShapesTask(root / "data", num_train=4, num_val=2, num_test=2)
    return text, task


def _module(parts, fuser=None, **kwargs):
    text, task = parts
    torch.manual_seed(0)

    def fusion(**dims):
        extra = {"fuser": fuser} if fuser is not None else {}
        return FusionModel(**dims, width=32, depth=2, num_heads=2, dropout=0.0, **extra)

    def head(width, num_classes):
        return ClassifierHead(width, num_classes, dropout=0.0)

    return FusionLitModule(_encoders(kwargs.pop("seed_b", 1)), text, task, fusion=fusion, head=head, **kwargs)


def _batch(parts):
    text, _ = parts
    torch.manual_seed(3)
    tok = text.tokenize(["what color is the circle?", "how many shapes are there?"])
    return {
        "images": {"a": torch.randn(2, 3, 32, 32), "b": torch.randn(2, 3, 32, 32)},
        **tok,
        "labels": torch.tensor([0, 1]),
        "targets": torch.tensor([0, 1]),
        "answer_types": torch.tensor([0, 2]),
    }


def test_encoders_stay_frozen_and_in_eval_mode(parts):
    module = _module(parts).train()
    assert all(not enc.model.training for enc in module.encoders.values())
    assert not any(p.requires_grad for p in module.encoders.parameters())
    assert any(p.requires_grad for p in module.fusion.parameters())


def test_drop_encoders_changes_predictions_only_through_the_dropped_encoder(parts):
    batch = _batch(parts)
    noisy = dict(batch, images=dict(batch["images"], b=torch.randn(2, 3, 32, 32) * 5))
    dropped = _module(parts, drop_encoders=["b"]).eval()
    torch.testing.assert_close(dropped(batch)[0], dropped(noisy)[0], atol=1e-6, rtol=0)
    full = _module(parts).eval()
    assert not torch.allclose(full(batch)[0], full(noisy)[0], atol=1e-4)
    # The same weights, with and without the drop, predict differently.
    dropped.load_state_dict(full.state_dict())
    assert not torch.allclose(full(batch)[0], dropped(batch)[0], atol=1e-4)


def test_ve_dropout_p_zero_is_a_no_op_in_training(parts):
    batch = _batch(parts)
    module = _module(parts, ve_dropout=0.0)
    module.train()
    train_logits = module(batch)[0]
    module.eval()
    torch.testing.assert_close(train_logits, module(batch)[0])
    # With p > 0 the same training-mode forward does drop encoders (otherwise this test proves nothing).
    module = _module(parts, ve_dropout=0.9).train()
    torch.manual_seed(0)
    assert not torch.allclose(module(batch)[0], module.eval()(batch)[0], atol=1e-4)


def test_checkpoint_leaves_out_encoder_weights_and_checks_fingerprints(parts):
    module = _module(parts)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert not any(k.startswith("encoders.") for k in ckpt["state_dict"])
    assert set(ckpt["encoder_fingerprints"]) == {"a", "b"}

    same = _module(parts)
    restored = {"state_dict": dict(ckpt["state_dict"]), "encoder_fingerprints": ckpt["encoder_fingerprints"]}
    same.on_load_checkpoint(restored)
    same.load_state_dict(restored["state_dict"])  # strict: encoder weights were filled back in

    other = _module(parts, seed_b=5)
    with pytest.raises(ValueError, match=r"encoder 'b' differs .*sha256"):
        other.on_load_checkpoint({**ckpt, "state_dict": dict(ckpt["state_dict"])})


def test_empty_encoder_list_is_refused(parts):
    text, task = parts
    with pytest.raises(ValueError, match="encoder list is empty"):
        FusionLitModule({}, text, task)


def test_encoder_prefix_tokens_reach_the_fuser(parts, tmp_path):
    text, task = parts
    encoders = _encoders()
    encoders["b"] = TimmEncoder("b", "vit_base_patch16_224.dino", init_seed=1, model_kwargs={**TINY, "reg_tokens": 2})
    assert encoders["a"].num_prefix_tokens == 1 and encoders["b"].num_prefix_tokens == 3
    assert encoders["b"].num_tokens == 3 + 4

    def fusion(**dims):
        return FusionModel(**dims, width=32, depth=1, num_heads=2, tokens_per_encoder=1)

    module = FusionLitModule(encoders, text, task, fusion=fusion)
    assert module.fusion.fuser.encoder_prefix == {"a": 1, "b": 3}
    assert module.fusion.fuser.num_tokens == (1 + 1) + (3 + 1)  # prefix tokens kept, 2x2 grids pooled to 1

    # transformers: the probe's token count minus the config's patch grid (here [CLS] + 4 registers).
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_register_tokens=4,
    )
    Dinov2WithRegistersModel(cfg).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    hf = HFVisionEncoder("hf", tmp_path)
    assert hf.num_tokens == 1 + 4 + 16 and hf.num_prefix_tokens == 5


def test_mixing_fuser_statistics_and_encoder_drop(parts):
    batch = _batch(parts)
    module = _module(parts, fuser=ResamplerFuser, drop_encoders=["b"]).eval()
    attention, fuser = AttentionStatsCallback(), FuserWeightsCallback()
    for callback in (attention, fuser):
        callback.on_validation_epoch_start(None, module)
    assert attention.metrics["val"].group_names == ["a", "b", "fused", "text", "cls"]
    outputs = module.validation_step(batch, 0)  # the step output feeds the statistics callbacks
    for callback in (attention, fuser):
        callback.on_validation_batch_end(None, module, outputs, batch, 0)
    weights = fuser.metrics["val"].compute()
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0]))
    stats = attention.metrics["val"].compute()
    assert torch.all(stats[..., :2] == 0) and torch.all(stats[..., 2] > 0)  # visual mass is all "fused"
    noisy = dict(batch, images=dict(batch["images"], b=torch.randn(2, 3, 32, 32) * 5))
    torch.testing.assert_close(module(batch)[0], module(noisy)[0], atol=1e-6, rtol=0)
    fuser.on_validation_epoch_start(None, _module(parts))
    assert "val" not in fuser.metrics  # token_concat: the attention statistics tell
    assert {type(c) for c in module.configure_callbacks()} == {AttentionStatsCallback, FuserWeightsCallback}
    module.stats_callbacks = False  # train.py: its callbacks group decides
    assert module.configure_callbacks() == []


def test_checkpoint_carries_the_answer_vocabulary_and_refuses_another(parts):
    module = _module(parts)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["task_answers"] == module.task.answers
    _module(parts).on_load_checkpoint({**ckpt, "state_dict": dict(ckpt["state_dict"])})
    # Checkpoints written before the vocabulary was stored still load.
    _module(parts).on_load_checkpoint({k: v for k, v in ckpt.items() if k != "task_answers"} | {
        "state_dict": dict(ckpt["state_dict"])})
    swapped = list(ckpt["task_answers"])
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(ValueError, match=rf"first differing at index 1: checkpoint {swapped[1]!r} vs task"):
        _module(parts).on_load_checkpoint({**ckpt, "task_answers": swapped, "state_dict": dict(ckpt["state_dict"])})
    short = ckpt["task_answers"][:3]
    with pytest.raises(ValueError, match=r"trained with a 3-answer vocabulary .* index 3: checkpoint \(end\)"):
        _module(parts).on_load_checkpoint({**ckpt, "task_answers": short, "state_dict": dict(ckpt["state_dict"])})


def test_score_batch_means_the_loss_over_annotated_examples_across_batches(parts):
    module = _module(parts).eval()
    full = _batch(parts)
    # One batch with both examples annotated, one with only its first, one with none (its loss is NaN).
    half = dict(full, labels=torch.tensor([0, -1]), targets=torch.tensor([0, -1]))
    unannotated = dict(full, labels=torch.tensor([-1, -1]), targets=torch.tensor([-1, -1]))
    metric, loss_mean = module.task.metric(), MeanMetric(nan_strategy="ignore")
    with torch.no_grad():
        for batch in (full, half, unannotated):
            logits, out = module.score_batch(batch, metric, loss_mean)
            assert logits.shape == (2, module.task.num_classes) and out.pooled.shape[0] == 2
        per_example = torch.nn.functional.cross_entropy(module(full)[0], full["targets"], reduction="none")
    expected = (per_example.sum() + per_example[0]) / 3
    torch.testing.assert_close(loss_mean.compute(), expected)
    hits = (logits.argmax(-1) == full["labels"]).float()
    torch.testing.assert_close(metric.compute()[""], (hits.sum() + hits[0]) / 3)


def test_annotated_count_reads_label_indices_and_soft_scores():
    assert annotated_count({"targets": torch.tensor([3, -1, 0])}) == 2
    soft = torch.tensor([[0.0, 1.0], [-1.0, -1.0], [0.3, 0.0]])  # VQA: all -1 for an unannotated question
    assert annotated_count({"targets": soft}) == 2


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("lr", "fast", r"training.lr='fast': expected a number > 0$"),
        ("lr", 0.0, r"training.lr=0.0: expected a number > 0$"),
        ("weight_decay", -0.1, r"training.weight_decay=-0.1: expected a number >= 0$"),
        ("warmup_ratio", 1.5, r"training.warmup_ratio=1.5: expected a number in \[0, 1\]$"),
        ("ve_dropout", "abc", r"training.ve_dropout='abc': expected a number in \[0, 1\)$"),
        ("ve_dropout", {"a": 0.2, "b": "abc"}, r"training.ve_dropout.b='abc': expected a number in \[0, 1\)$"),
    ],
)
def test_numeric_options_are_checked_where_the_module_is_built_naming_the_key(parts, option, value, says):
    with pytest.raises(ValueError, match=says):
        _module(parts, **{option: value})


def test_numeric_options_given_as_strings_become_floats(parts):
    module = _module(parts, lr="3e-4", ve_dropout={"a": "0.25"})  # YAML reads 3e-4 as a string
    assert module.hparams.lr == 3e-4 and module.hparams.ve_dropout == {"a": 0.25}
    assert module.ve_dropout.p.tolist() == [0.25, 0.0]


def test_eval_mode_modules_are_frozen_ones_said_once_or_named(parts, caplog):
    module = _module(parts).train()
    with caplog.at_level(logging.INFO, logger="fusion.training.module"):
        expected, others = module.report_eval_modes()
    assert expected and all(n.startswith("encoders.") for n in expected) and others == []
    assert f"{len(expected)} modules of the frozen encoders are in eval mode on purpose" in caplog.text
    caplog.clear()
    module.head.eval()  # a module that trains, left in eval mode by mistake
    with caplog.at_level(logging.INFO, logger="fusion.training.module"):
        expected_again, others = module.report_eval_modes()
    assert expected_again == expected and others and all(n.startswith("head") for n in others)
    assert f"{len(others)} modules that train are in eval mode as training starts: head" in caplog.text


def test_a_checkpoint_of_another_task_is_refused_naming_both_tasks(parts, tmp_path):
    from fusion.tasks.hateful_memes import HatefulMemesTask

    module = _module(parts)
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert ckpt["task_name"] == "shapes"
    text, _ = parts
    other = _module((text, HatefulMemesTask(tmp_path)))
    # 15 shapes answers: 5 colours, 3 shapes, counts 1-3, 4 positions.
    with pytest.raises(ValueError, match=r"checkpoint was trained on task 'shapes' \(15 answers\), but the config's "
                       r"task is 'hateful_memes' \(2 answers\); evaluate it with task 'shapes'") as refused:
        other.on_load_checkpoint({**ckpt, "state_dict": dict(ckpt["state_dict"])})
    assert "vocab_file" not in str(refused.value)  # pinning a vocabulary would not help
