"""eval.py mode=probe on a tiny trained checkpoint: per-depth linear probes against the majority class."""

import pytest
import torch
from analysis_helpers import check_wandb, run_mode, tiny_checkpoint

from fusion.analysis.probe import fit_probe, probe_accuracy, shapes_properties
from fusion.tasks.base import Example
from fusion.tasks.shapes import SceneObject, render_scene

DEPTHS = ["input", "layer 0", "final"]


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    ckpt, workdir = tiny_checkpoint(tmp_path_factory)
    # With a wandb logger too: the tables and figures go there as well (offline run in the run folder).
    results = run_mode("probe", ckpt, workdir, "analysis.probe.max_fit=600", "logger=wandb")
    return results, workdir / "eval_probe" / "probe"


def test_every_property_is_probed_at_every_depth(probes):
    results, _ = probes
    assert results["depths"] == DEPTHS
    assert results["fit_examples"] == 600 and results["test_examples"] == 300
    assert set(results["probes"]) == {"answer_type", "answer", "encoders", "num_shapes", "top_left_color"}
    for by_rep in results["probes"].values():
        assert set(by_rep) == {"cls", "mean"}
        for by_depth in by_rep.values():
            assert set(by_depth) == set(DEPTHS)  # results.json sorts keys; "depths" keeps the order
            assert all(0 <= r["accuracy"] <= 1 and 0 <= r["majority"] <= 1 for r in by_depth.values())
    assert results["probes"]["encoders"]["cls"]["final"]["classes"] == 3  # clip, dino, clip+dino


def test_probes_beat_the_majority_where_the_representation_encodes_the_property(probes):
    results, _ = probes
    p = results["probes"]
    # The question's type is in its words, which every token's state mixes in from the first block on.
    assert p["answer_type"]["cls"]["final"]["accuracy"] > p["answer_type"]["cls"]["final"]["majority"] + 0.3
    # The head reads the final [CLS] state, and the model answers well above the majority answer.
    assert p["answer"]["cls"]["final"]["accuracy"] > p["answer"]["cls"]["final"]["majority"] + 0.1
    # Which encoders are visible decides which tokens the mean covers.
    assert p["encoders"]["mean"]["input"]["accuracy"] > p["encoders"]["mean"]["input"]["majority"] + 0.3


def test_the_input_cls_state_carries_nothing(probes):
    results, _ = probes
    # [CLS] enters as one learned vector for every sample: its probe can only answer the majority class.
    for by_rep in results["probes"].values():
        assert by_rep["cls"]["input"]["accuracy"] == pytest.approx(by_rep["cls"]["input"]["majority"])


def test_modality_importance_and_report(probes):
    results, folder = probes
    heads = results["modality_importance"]
    assert len(heads) == 4
    for h in heads:
        for q in ("cls", "text"):
            total = h[f"{q}_to_image"] + h[f"{q}_to_text"] + h[f"{q}_to_cls"]
            assert total == pytest.approx(1, abs=1e-5)
    report = (folder / "report.md").read_text()
    for png in ("probe_curves.png", "modality_importance.png"):
        assert (folder / png).stat().st_size > 10_000 and f"]({png})" in report
    assert (folder / "probes.csv").read_text().count("\n") == 1 + 5 * 2 * 3
    assert results["figures"]["modality_importance"]["rows"] == ["L0 H0", "L0 H1", "L1 H0", "L1 H1"]
    summary = check_wandb(folder.parent, "probe")
    assert summary["analysis/probe/table/probes"]["nrows"] == 5 * 2 * 3


def test_shapes_properties_read_the_pixels(tmp_path):
    objects = [SceneObject("blue", "circle", 0, (4, 4, 26, 26)), SceneObject("red", "triangle", 3, (36, 36, 60, 60))]
    path = tmp_path / "scene.png"
    render_scene(objects, 64).save(path)
    example = Example("q", "k", path, "what?")
    assert shapes_properties(example) == {"num_shapes": "2", "top_left_color": "blue"}
    render_scene(objects[1:], 64).save(path)
    assert shapes_properties(example) == {"num_shapes": "1", "top_left_color": "empty"}


def test_probe_separates_linearly_separable_classes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = ["a" if v > 0 else "b" for v in (x[:, 0] - 0.5 * x[:, 1]).tolist()]
    result = probe_accuracy(x[:150], y[:150], x[150:], y[150:], steps=100)
    assert result["accuracy"] > 0.95 and result["classes"] == 2
    w = fit_probe(x, torch.tensor([0, 1] * 100), 2)
    assert w.shape == (6, 2)
