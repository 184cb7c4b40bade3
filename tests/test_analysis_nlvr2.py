"""Analysis modes on a two-image task through eval.py: encoder_ablation, cross_modal_ablation and attention split
by gold label (``split_by: auto`` on a task without answer types: the path NLVR, NLVR2 and Hateful Memes take),
on an NLVR2 checkpoint in the official format (test_nlvr2's writer).

The statements are true exactly when the left image is red enough, so a few epochs teach the tiny model to
read the images, and taking the images away (mean tokens) must cost accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from analysis_helpers import strict_json
from entrypoints import run
from test_nlvr2 import write_nlvr2

ENCODERS = ["clip_tiny", "dino_tiny"]
TINY = [f"encoder=[{','.join(ENCODERS)}]", "text=tiny", "fusion.width=32", "fusion.depth=1", "fusion.num_heads=2",
        "data.num_workers=0", "data.batch_size=8", "logger=csv"]
MODES = ["encoder_ablation", "cross_modal_ablation", "attention"]
DEV = 16


def rows(split: str, first: int, n: int) -> list[tuple[str, str, str]]:
    """``n`` statements, each about its own image pair; write_nlvr2 colours row k's left image (40k mod 256, 0,
    90): the statement is true when that red channel is at least 128."""
    return [(f"{split}-{first + k}-0-0", f"Statement {k % 3}.", "True" if 40 * k % 256 >= 128 else "False")
            for k in range(n)]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """mode -> (results.json, report folder) on split dev."""
    workdir = tmp_path_factory.mktemp("analysis_nlvr2")
    root = write_nlvr2(workdir / "nlvr2", {"train": rows("train", 100, 48), "dev": rows("dev", 900, DEV),
                                           "test1": rows("test1", 500, 4)})
    common = ["+experiment=nlvr2", f"task.root={root}", *TINY]
    train = ["trainer.max_epochs=4", "training.lr=1e-3", "training.attention_stats=false",
             "+trainer.num_sanity_val_steps=0"]
    proc = run("train.py", [*common, *train, f"hydra.run.dir={workdir / 'train'}"], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = workdir / "train" / "checkpoints" / "last.ckpt"
    out = {}
    for mode in MODES:
        folder = workdir / mode
        proc = run("eval.py", [f"mode={mode}", f"ckpt_path={ckpt}", *common, "split=dev", f"hydra.run.dir={folder}"],
                   workdir)
        assert proc.returncode == 0, (mode, proc.stderr[-4000:])
        out[mode] = strict_json((folder / mode / "results.json").read_text()), folder / mode
    return out


def test_encoder_ablation_scores_every_subset_and_the_images_matter(reports):
    results, folder = reports["encoder_ablation"]
    assert results["task"] == "nlvr2" and results["split"] == "dev"
    subsets = results["subsets"]
    assert set(subsets) == {"clip_tiny", "dino_tiny", "clip_tiny+dino_tiny", "none (mean tokens)"}
    for values in subsets.values():
        assert values["n"] == DEV and 0 <= values["acc"] <= 1 and 0 <= values["acc_consistency"] <= 1
    assert (folder / "subsets.csv").read_text().count("\n") == 1 + 4
    # The answer is in the images: without them (mean tokens) the metric falls.
    assert subsets["none (mean tokens)"]["acc"] < subsets["clip_tiny+dino_tiny"]["acc"]
    assert set(results["marginal"]) == set(ENCODERS)


def test_cross_modal_ablation_of_both_images(reports):
    results, _ = reports["cross_modal_ablation"]
    conditions = results["conditions"]
    assert set(conditions) == {"none", *(f"vision:{e}" for e in ENCODERS), "vision:all", "text", "vision:all+text"}
    assert all(v["n"] == DEV and 0 <= v["acc"] <= 1 for v in conditions.values())
    assert results["changes"]["vision:all"]["metric_change"] < 0
    assert results["changes"]["vision:all"]["metric_change"] == pytest.approx(
        conditions["vision:all"]["acc"] - conditions["none"]["acc"])
    # The unablated condition is the same evaluation as encoder_ablation's full subset.
    full = reports["encoder_ablation"][0]["subsets"]["clip_tiny+dino_tiny"]
    assert conditions["none"] == pytest.approx(full)


def test_attention_split_by_label_covers_the_split_and_each_group_sums_to_one(reports):
    results, folder = reports["attention"]
    groups = results["groups"]
    assert results["split_by"] == "label" and groups == [*ENCODERS, "text", "cls"]
    by = results["by"]
    assert set(by) == {"True", "False"}
    assert sum(p["n"] for p in by.values()) == results["metrics"]["n"] == DEV
    assert {k: p["n"] for k, p in by.items()} == {"True": 6, "False": 10}  # rows 4-6 and 10-12 are true
    for part in [results, *by.values()]:
        for query in ("cls", "text"):
            mass = torch.tensor(part[query])  # (layers, heads, groups): both images' tokens in the encoders'
            assert mass.shape == (1, 2, len(groups))
            assert bool(((mass >= 0) & (mass <= 1)).all())
            assert torch.allclose(mass.sum(-1), torch.ones(1, 2), atol=1e-5)
            assert bool((mass[..., :2].sum(-1) > 0).all())
    lines = (folder / "by_label.csv").read_text().splitlines()
    assert lines[0].split(",") == ["label", "n", "query", *groups] and len(lines) == 1 + 2 * 2
    panels = results["figures"]["cls_by_label_layers"]["panels"]
    assert set(panels) == {"True", "False"}
    for name, values in panels.items():
        assert torch.tensor(values).allclose(torch.tensor(by[name]["cls"]).mean(1))
    report = (folder / "report.md").read_text()
    for name in ("cls_by_label", "text_by_label_layers"):
        assert (folder / f"{name}.png").stat().st_size > 5_000 and f"]({name}.png)" in report
