"""Every analysis mode through eval.py on a real task: VQAv2 in the official format (written by test_vqa's
helper: 12 training and 6 validation questions, three answer types), one-epoch checkpoint from train.py.

Checks what holds on any checkpoint: one row per encoder subset, attention masses in [0, 1] summing to 1 per
(layer, head), the split by answer type, a probe curve per depth, causal tracing from a JSON Lines pair file
restoring the clean / corrupted scores exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from entrypoints import run
from test_vqa import write_vqa

ENCODERS = ["clip_tiny", "dino_tiny"]
TINY = [f"encoder=[{','.join(ENCODERS)}]", "text=tiny", "fusion.width=32", "fusion.depth=2", "fusion.num_heads=2",
        "data.num_workers=0", "data.batch_size=4", "data.eval_batch_size=4", "logger=csv"]
MODES = ["encoder_ablation", "attention", "cross_modal_ablation", "probe", "causal_trace"]
ANSWER_TYPES = {"yes/no", "number", "other"}
# One word swapped in each validation question (write_vqa's three questions about images 11 and 12).
SWAPS = {"what color is the image?": "what color is the box?", "is the image red?": "is the image green?",
         "how many colors are there?": "how many shapes are there?"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """mode -> (results.json, report folder) of every mode on split val2014."""
    workdir = tmp_path_factory.mktemp("analysis_vqa")
    data = write_vqa(workdir / "vqa")
    common = ["+experiment=vqav2", f"task.root={data}", *TINY]
    train = ["trainer.max_epochs=1", "training.attention_stats=false", "+trainer.num_sanity_val_steps=0"]
    proc = run("train.py", [*common, *train, f"hydra.run.dir={workdir / 'train'}"], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = workdir / "train" / "checkpoints" / "last.ckpt"

    questions = json.loads((data / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    pairs = workdir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"question_id": q["question_id"], "corrupted_question": SWAPS[q["question"]]})
                             + "\n" for q in questions))
    extra = {"causal_trace": [f"analysis.causal_trace.pairs={pairs}", "analysis.causal_trace.min_effect=-1"]}
    out = {}
    for mode in MODES:
        folder = workdir / mode
        args = [f"mode={mode}", f"ckpt_path={ckpt}", *common, "split=val2014", "analysis.device=cpu",
                *extra.get(mode, []), f"hydra.run.dir={folder}"]
        proc = run("eval.py", args, workdir)
        assert proc.returncode == 0, (mode, proc.stderr[-4000:])
        out[mode] = json.loads((folder / mode / "results.json").read_text()), folder / mode
        assert (folder / mode / "report.md").is_file()
    out["questions"] = questions, pairs
    return out


def _figures(folder: Path, *names: str) -> None:
    report = (folder / "report.md").read_text()
    for name in names:
        assert (folder / f"{name}.png").stat().st_size > 5_000 and f"]({name}.png)" in report, name


def test_encoder_ablation_has_one_row_per_subset(reports):
    results, folder = reports["encoder_ablation"]
    assert results["task"] == "vqav2" and results["split"] == "val2014" and results["metric"] == "acc"
    subsets = results["subsets"]
    # results.json sorts keys: sets of names.
    assert set(subsets) == {"clip_tiny", "dino_tiny", "clip_tiny+dino_tiny", "none (mean tokens)"}
    for values in subsets.values():
        assert values["n"] == 6 and 0 <= values["acc"] <= 1
        assert {"acc_yes_no", "acc_number", "acc_other"} <= set(values)
    assert 0 <= results["baselines"]["majority"] <= 1
    assert set(results["marginal"]) == set(ENCODERS)
    assert (folder / "subsets.csv").read_text().count("\n") == 1 + 4
    _figures(folder, "subsets", "marginal")


def _check_masses(by_layer: list, groups: list[str]) -> None:
    for layer in by_layer:
        for head in layer:
            assert len(head) == len(groups) and all(0 <= m <= 1 for m in head)
            assert sum(head) == pytest.approx(1, abs=1e-5)


def test_attention_masses_sum_to_one_and_split_by_answer_type(reports):
    results, folder = reports["attention"]
    groups = results["groups"]
    assert groups == [*ENCODERS, "text", "cls"] and results["num_layers"] == 2 and results["num_heads"] == 2
    for query in ("cls", "text"):
        _check_masses(results[query], groups)
    assert results["split_by"] == "answer_type" and set(results["by"]) == ANSWER_TYPES
    assert {name: part["n"] for name, part in results["by"].items()} == {t: 2 for t in ANSWER_TYPES}
    for part in results["by"].values():
        for query in ("cls", "text"):
            _check_masses(part[query], groups)
    rows = (folder / "by_answer_type.csv").read_text().splitlines()
    assert rows[0].split(",") == ["answer_type", "n", "query", *groups] and len(rows) == 1 + 3 * 2
    _figures(folder, "cls_layers", "text_heads", "heads_ranked", "cls_by_answer_type", "text_by_answer_type")


def test_cross_modal_ablation_conditions(reports):
    results, folder = reports["cross_modal_ablation"]
    assert set(results["conditions"]) == {"none", "vision:clip_tiny", "vision:dino_tiny", "vision:all", "text",
                                          "vision:all+text"}
    assert all(v["n"] == 6 and 0 <= v["acc"] <= 1 for v in results["conditions"].values())
    clean = results["conditions"]["none"]
    for name, change in results["changes"].items():
        assert change["metric_change"] == pytest.approx(results["conditions"][name]["acc"] - clean["acc"])
    _figures(folder, "changes")


def test_probe_curve_per_layer_for_answer_type(reports):
    results, folder = reports["probe"]
    assert results["fit_split"] == "train2014" and results["fit_examples"] == 12 and results["test_examples"] == 6
    assert results["depths"] == ["input", "layer 0", "final"]
    assert {"answer_type", "answer", "encoders"} <= set(results["probes"])
    for rep in ("cls", "mean"):
        curve = results["probes"]["answer_type"][rep]
        assert set(curve) == set(results["depths"])
        assert all(0 <= r["accuracy"] <= 1 and r["classes"] == 3 for r in curve.values())
    assert len(results["modality_importance"]) == 2 * 2
    _figures(folder, "probe_curves", "modality_importance")


def test_causal_trace_from_a_jsonl_pair_file(reports):
    results, folder = reports["causal_trace"]
    questions, _ = reports["questions"]
    assert results["corrupt"] == "text" and results["num_pairs"] == results["candidate_pairs"] == 6
    assert results["restore_all_exact"] and results["restore_none_exact"]
    assert results["restore_all_score"] == [results["clean_score"]] * 2
    assert results["restore_none_score"] == [results["corrupted_score"]] * 2
    text = {str(q["question_id"]): q["question"] for q in questions}
    for pair in results["pairs"]:
        assert pair["question"] == text[pair["question_id"]]
        assert pair["corrupted_question"] == SWAPS[pair["question"]]
    labels = results["positions"]
    assert labels[0] == "[CLS]" and sum(label.startswith("clip_tiny[") for label in labels) == 17
    _figures(folder, "positions", "heads")
