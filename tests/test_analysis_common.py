"""fusion/analysis/common.py: subsets, encoder keep/ablation helpers, the question-prior baseline, reports;
and every analysis mode on a fuser that mixes encoders (gated), from a two-batch checkpoint."""

import json
from types import SimpleNamespace

import pytest
import torch
from entrypoints import run

from fusion.analysis.common import keep_only, question_prior_accuracy, subsets, with_features
from fusion.model.dropout import EncoderDropout
from fusion.tasks.base import Example, VLTask

MODES = ["encoder_ablation", "attention", "cross_modal_ablation", "probe", "causal_trace"]


def test_subsets_are_all_non_empty_combinations():
    assert subsets(["a", "b", "c"]) == [("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]


def test_keep_only_drops_the_others_and_restores_ve_dropout():
    model = torch.nn.Module()
    model.encoder_names = ["a", "b", "c"]
    model.device = torch.device("cpu")
    original = EncoderDropout(model.encoder_names, p=0.5)
    model.ve_dropout = original
    with keep_only(model, ["b"]):
        assert model.ve_dropout(2).tolist() == [[False, True, False]] * 2
    assert model.ve_dropout is original


def test_with_features_sets_one_token_at_every_position_and_keeps_the_rest():
    encoder = SimpleNamespace(num_tokens=5, embed_dim=3)
    model = SimpleNamespace(encoders={"a": encoder}, task=SimpleNamespace(images_per_example=1),
                            device=torch.device("cpu"), dtype=torch.float32)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "images": {"a": torch.zeros(2, 3, 8, 8)}}
    out = with_features(model, batch, {"a": torch.tensor([1.0, 2.0, 3.0])})
    assert out["features"]["a"].shape == (2, 5, 3) and out["features"]["a"][1, 4].tolist() == [1.0, 2.0, 3.0]
    assert "features" not in batch and out["images"] is batch["images"]
    model.task.images_per_example = 2
    assert with_features(model, batch, {"a": torch.ones(3)})["features"]["a"].shape == (2, 2, 5, 3)


class _Task:
    train_split, answers = "train", ["x", "y", "z"]
    answer_accuracy = VLTask.answer_accuracy  # exact match with the label

    def examples(self, split):
        rows = {
            "train": [("q1", 0, "t"), ("q1", 0, "t"), ("q1", 1, "t"), ("q2", 2, "u"), ("q3", 1, "t")],
            "val": [("q1", 0, "t"), ("q2", 1, "u"), ("q9", 0, "t"), ("q9", 2, "v")],
        }[split]
        return [Example(str(i), "k", "p", q, label, t) for i, (q, label, t) in enumerate(rows)]


def test_question_prior_uses_the_question_then_its_type_then_the_overall_answer():
    # q1 -> x (right), q2 -> z (wrong), unseen q9 of type t -> t's most frequent x (right), of type v -> x (wrong)
    assert question_prior_accuracy(_Task(), "val") == pytest.approx(2 / 4)


def test_every_mode_runs_on_a_fuser_that_mixes_encoders(tmp_path):
    common = [
        "+experiment=shapes", "fusion=gated", "encoder=[clip_tiny,dino_tiny]", "logger=csv",
        "task.num_train=40", "task.num_val=10", "task.num_test=10", "data.num_workers=0", "data.batch_size=8",
        "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
    ]
    proc = run("train.py", [*common, "trainer.max_epochs=1", "training.attention_stats=false",
                            f"hydra.run.dir={tmp_path / 'train'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    for mode in MODES:
        out = tmp_path / mode
        proc = run("eval.py", [f"mode={mode}", f"ckpt_path={ckpt}", *common, "analysis.max_batches=2",
                               "analysis.probe.max_fit=64", "analysis.causal_trace.min_effect=-1",
                               f"hydra.run.dir={out}"], tmp_path)
        assert proc.returncode == 0, (mode, proc.stderr[-3000:])
        assert (out / mode / "report.md").is_file()
    attention = json.loads((tmp_path / "attention" / "attention" / "results.json").read_text())
    assert attention["groups"] == ["clip_tiny", "dino_tiny", "fused", "text", "cls"]
    heads = attention["heads"]
    assert all(h["text_to_image"] + h["text_to_text"] + h["text_to_cls"] == pytest.approx(1, abs=1e-5) for h in heads)
    trace = json.loads((tmp_path / "causal_trace" / "causal_trace" / "results.json").read_text())
    assert trace["restore_all_exact"] and trace["restore_none_exact"]
