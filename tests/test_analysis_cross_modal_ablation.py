"""eval.py mode=cross_modal_ablation on a tiny trained checkpoint: visual and text ablation against the model."""

import csv

import pytest
import torch
from analysis_helpers import ENCODERS, check_wandb, eval_metrics, run_mode, tiny_checkpoint

from fusion.analysis.common import mask_text


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    ckpt, workdir = tiny_checkpoint(tmp_path_factory)
    folder = workdir / "eval_cross_modal_ablation" / "cross_modal_ablation"
    # With a wandb logger too: the tables and figures go there as well (offline run in the run folder).
    return run_mode("cross_modal_ablation", ckpt, workdir, "logger=wandb"), folder


def test_every_condition_is_scored_on_the_whole_split(ablation):
    results, _ = ablation
    names = ["none", *(f"vision:{e}" for e in ENCODERS), "vision:all", "text", "vision:all+text"]
    assert set(results["conditions"]) == set(names)  # results.json sorts its keys; conditions.csv keeps the order
    for values in results["conditions"].values():
        assert values["n"] == 300 and 0 <= values["acc"] <= 1


def test_changes_are_against_the_unablated_model(ablation):
    results, _ = ablation
    clean = results["conditions"]["none"]
    for name, change in results["changes"].items():
        assert change["metric_change"] == pytest.approx(results["conditions"][name]["acc"] - clean["acc"])
        assert change["loss_change"] == pytest.approx(results["conditions"][name]["loss"] - clean["loss"])
    assert results["summary"]["language_for_vision"] == results["changes"]["text"]
    assert results["summary"]["vision_for_language"]["all"] == results["changes"]["vision:all"]


def test_the_unablated_condition_is_what_eval_py_reports(ablation, tmp_path_factory):
    results, _ = ablation
    # Both score batches with FusionLitModule.score_batch: the same metric and loss on the same split.
    metrics = eval_metrics(*tiny_checkpoint(tmp_path_factory), split="val")
    clean = {k: v for k, v in results["conditions"]["none"].items() if k != "n"}
    assert {"acc", "acc_color", "loss"} <= set(clean)
    # Equal up to float32 rounding (eval.py sums with torch's default thread count, the analysis with one).
    assert {k: metrics[f"val/{k}"] for k in clean} == pytest.approx(clean, rel=1e-6)


def test_the_trained_model_needs_both_modalities(ablation):
    results, _ = ablation
    changes = results["changes"]
    # Without the image the answers fall towards the image-blind question prior; without the words the
    # model cannot tell which question is asked.
    for name in ("vision:all", "text", "vision:all+text"):
        assert changes[name]["metric_change"] < -0.05 and changes[name]["loss_change"] > 0, name
    prior = results["baselines"]["question_prior"]
    assert abs(results["conditions"]["vision:all"]["acc"] - prior) < abs(results["conditions"]["none"]["acc"] - prior)


def test_report_folder(ablation):
    _, folder = ablation
    with open(folder / "conditions.csv") as f:
        order = [r["condition"] for r in csv.DictReader(f)]
    assert order == ["none", *(f"vision:{e}" for e in ENCODERS), "vision:all", "text", "vision:all+text"]
    assert (folder / "changes.png").stat().st_size > 10_000
    assert "](changes.png)" in (folder / "report.md").read_text()
    summary = check_wandb(folder.parent, "cross_modal_ablation")
    assert summary["analysis/cross_modal_ablation/table/conditions"]["nrows"] == len(order)


def test_mask_text_replaces_only_real_non_special_tokens():
    batch = {
        "input_ids": torch.tensor([[2, 10, 11, 3, 0], [2, 12, 3, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    }
    out = mask_text(batch, mask_id=4, special_ids=[0, 2, 3])
    assert out["input_ids"].tolist() == [[2, 4, 4, 3, 0], [2, 4, 3, 0, 0]]
    assert out["attention_mask"] is batch["attention_mask"]
