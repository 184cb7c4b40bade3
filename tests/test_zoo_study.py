"""The subset study's collection: a sweep folder's jobs -> table, plot and summary."""

import csv
import itertools
import json

import pytest
import yaml

from fusion.zoo.study import collect, summarize, write_study

TINY = ["clip_tiny", "dino_tiny", "vit_tiny"]
SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations(TINY, r)]


def _sweep(tmp_path, accs):
    for job, (subset, acc) in enumerate(zip(SUBSETS, accs, strict=True)):
        folder = tmp_path / str(job)
        folder.mkdir()
        (folder / "config_resolved.yaml").write_text(yaml.safe_dump({"encoder": {n: {"name": n} for n in subset}}))
        metrics = {"test/acc": acc, "val/acc": acc - 0.01, "test/acc_color": acc / 2, "test/majority_acc": 0.2}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_table_plot_and_summary_say_whether_fusion_beats_one_encoder(tmp_path):
    sweep = _sweep(tmp_path, [0.50, 0.40, 0.45, 0.62, 0.55, 0.48, 0.66])
    summary = write_study(sweep)
    assert summary["best_single"] == {"subset": "clip_tiny", "test/acc": 0.50}
    assert summary["best_fused"] == {"subset": "clip_tiny+dino_tiny+vit_tiny", "test/acc": 0.66}
    assert summary["fused_gain"] == pytest.approx(0.16) and summary["all_gain"] == pytest.approx(0.16)
    rows = list(csv.DictReader((sweep / "subsets.csv").open()))
    assert [r["subset"] for r in rows] == ["+".join(s) for s in SUBSETS]
    assert (sweep / "subsets.png").stat().st_size > 0
    md = (sweep / "subsets.md").read_text().splitlines()
    assert md[0].startswith("| subset |") and len(md) == 2 + 7
    assert json.loads((sweep / "summary.json").read_text()) == summary


def test_missing_metric_and_empty_sweep_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    rows = collect(_sweep(tmp_path / "a", [0.5] * 7))
    with pytest.raises(ValueError, match="'test/f1'"):
        summarize(rows, "test/f1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_study(tmp_path / "empty")
