"""NLVR2: the loader on official-format files, its errors, the metric, and train.py / eval.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from entrypoints import FAST, run, train_one_epoch, train_then_eval
from PIL import Image

from fusion.tasks.nlvr2 import NLVR2Task, image_names, sentence_group

# (identifier, sentence, label): two sentences over two image pairs each, as the official files have.
TRAIN = [
    ("train-10-0-0", "The left image contains twice the dogs of the right.", "True"),
    ("train-10-1-0", "The left image contains twice the dogs of the right.", "False"),
    ("train-10-0-1", "There are four dogs in total.", "False"),
    ("train-10-1-1", "There are four dogs in total.", "True"),
    ("train-11-0-0", "One image shows a red ball.", "True"),
    ("train-11-1-0", "One image shows a red ball.", "False"),
]
DEV = [
    ("dev-850-0-0", "Both images show a blue box.", "True"),
    ("dev-850-1-0", "Both images show a blue box.", "False"),
    ("dev-850-0-1", "Only the right image has a box.", "False"),
    ("dev-851-0-0", "There is a cat.", "True"),
]
TEST = [("test1-3-0-0", "A tree stands alone.", "False"), ("test1-3-1-0", "A tree stands alone.", "True")]


def write_nlvr2(root: Path, splits: dict[str, list[tuple[str, str, str]]] | None = None, repo: bool = False) -> Path:
    """A small NLVR2: <split>.json (data/<split>.json with ``repo``), train images in numbered subfolders
    below images/train/, dev and test images directly in images/<split>/."""
    splits = splits if splits is not None else {"train": TRAIN, "dev": DEV, "test1": TEST}
    data = root / "data" if repo else root
    data.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        lines = [
            json.dumps({"identifier": i, "sentence": s, "label": lab, "left_url": "x", "right_url": "y", "writer": "1"})
            for i, s, lab in rows
        ]
        (data / f"{split}.json").write_text("\n".join(lines) + "\n")
        for k, (identifier, _, _) in enumerate(rows):
            folder = root / "images" / split / (str(k % 2) if split == "train" else "")
            folder.mkdir(parents=True, exist_ok=True)
            for side, name in enumerate(image_names(identifier)):
                Image.new("RGB", (40 + 8 * side, 30), (40 * k % 256, 120 * side, 90)).save(folder / name)
    return root


def test_examples_carry_both_images_found_anywhere_below_the_images_folder(tmp_path):
    root = write_nlvr2(tmp_path / "nlvr2")
    task = NLVR2Task(root)
    task.prepare_data()
    assert task.splits == ("train", "dev", "test1") and task.images_per_example == 2
    train = task.examples("train")
    assert [e.question_id for e in train] == [row[0] for row in TRAIN]
    first = train[1]
    assert first.question == TRAIN[1][1] and task.answers[first.label] == "False"
    assert first.images == (
        ("nlvr2/train-10-1-img0", root / "images" / "train" / "1" / "train-10-1-img0.png"),
        ("nlvr2/train-10-1-img1", root / "images" / "train" / "1" / "train-10-1-img1.png"),
    )
    dev = task.examples("dev")
    assert dev[2].image_path == root / "images" / "dev" / "dev-850-0-img0.png"
    # Two sentences about one image pair share its images (and their cache keys).
    assert dev[0].images == dev[2].images


def test_repository_layout_and_an_images_folder_elsewhere(tmp_path):
    root = write_nlvr2(tmp_path / "nlvr2", {"dev": DEV}, repo=True)
    moved = tmp_path / "elsewhere"
    (root / "images").rename(moved)
    task = NLVR2Task(root, images_dir=moved)
    assert len(task.examples("dev")) == 4
    assert task.examples("dev")[0].image_path.parent == moved / "dev"


def test_unlabelled_lines_get_no_label(tmp_path):
    root = write_nlvr2(tmp_path / "nlvr2", {"test1": TEST})
    path = root / "test1.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        del row["label"]
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    task = NLVR2Task(root)
    assert [e.label for e in task.examples("test1")] == [-1, -1]
    assert task.majority_accuracy("test1") is None


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (2, {"label": "maybe"}, r"dev\.json line 2: label 'maybe' is not one of True, False"),
        (1, {"identifier": "dev-850-0"}, r"dev\.json line 1: identifier 'dev-850-0' is not of the form"),
        (3, {"sentence": None}, r"dev\.json line 3: missing field 'sentence'"),
        (1, {"identifier": 12}, r"dev\.json line 1: identifier 12 is not a string"),
        # Only a file without any label is unlabelled; a label dropped from a labelled file is an error.
        (2, {"label": None}, r"dev\.json line 2: missing field 'label' while other lines have one"),
    ],
)
def test_malformed_lines_name_file_line_and_expectation(tmp_path, line, replacement, message):
    root = write_nlvr2(tmp_path / "nlvr2", {"dev": DEV})
    path = root / "dev.json"
    lines = path.read_text().splitlines()
    row = json.loads(lines[line - 1])
    for key, value in replacement.items():
        if value is None:
            del row[key]
        else:
            row[key] = value
    lines[line - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        NLVR2Task(root).examples("dev")


def test_missing_files_and_images_are_named(tmp_path):
    root = write_nlvr2(tmp_path / "nlvr2", {"dev": DEV})
    (root / "images" / "dev" / "dev-851-0-img1.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"dev-851-0-img1\.png \(.*dev\.json line 4\)"):
        NLVR2Task(root).examples("dev")
    with pytest.raises(FileNotFoundError, match=r"test1\.json not found; expected NLVR2's JSON lines"):
        NLVR2Task(root).check_split("test1")
    with pytest.raises(FileNotFoundError, match="images folder .*nowhere not found; set task.images_dir"):
        NLVR2Task(root, images_dir="nowhere").prepare_data()
    (root / "dev.json").write_text("not json\n")
    with pytest.raises(ValueError, match=r"dev\.json line 1: not valid JSON"):
        NLVR2Task(root).examples("dev")


def test_consistency_groups_the_pairs_of_one_sentence():
    # The pair field is blanked: dev-850-0-0 and dev-850-1-0 are one sentence, dev-850-0-1 another.
    assert sentence_group("dev-850-0-0") == sentence_group("dev-850-1-0") == "dev-850--0"
    assert sentence_group("dev-850-0-0") != sentence_group("dev-850-0-1")
    assert sentence_group("dev-850-0-0") != sentence_group("dev-851-0-0")
    # Compared as strings, split included, as the official script does.
    assert sentence_group("dev-850-0-0") != sentence_group("test1-850-0-0")
    assert sentence_group("dev-850-0-07") != sentence_group("dev-850-1-7")
    task = NLVR2Task("/nonexistent")
    metric = task.metric()
    ids = [row[0] for row in DEV]
    labels = torch.tensor([1, 0, 0, 1])
    wrong = {"dev-850-1-0"}  # one pair of the first sentence wrong: that sentence is inconsistent
    preds = torch.tensor([1 - int(lab) if i in wrong else int(lab) for i, lab in zip(ids, labels, strict=True)])
    logits = torch.nn.functional.one_hot(preds, 2).float()
    task.update_metric(metric, logits[:2], {"labels": labels[:2], "question_ids": ids[:2]})
    task.update_metric(metric, logits[2:], {"labels": labels[2:], "question_ids": ids[2:]})
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out[""] == pytest.approx(3 / 4)
    assert out["consistency"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="identifier 'dev-1' is not of the form"):
        sentence_group("dev-1")
    # A fifth field would move the pair field the official script blanks: refused, not guessed.
    with pytest.raises(ValueError, match="identifier 'dev-850-0-0-1' is not of the form"):
        sentence_group("dev-850-0-0-1")


def official_metrics(predictions_csv: Path, gold_json: Path) -> tuple[float, float]:
    """Precision and consistency as the official nlvr2/eval/metrics.py computes them."""
    predictions = dict(line.strip().split(",") for line in predictions_csv.read_text().splitlines())
    examples = [json.loads(line) for line in gold_json.read_text().splitlines() if line]
    assert len(predictions) == len(examples)
    correct, consistent = 0, {}
    for ex in examples:
        fields = ex["identifier"].split("-")
        fields[2] = ""
        key = "-".join(fields)
        consistent.setdefault(key, True)
        if predictions[ex["identifier"]].lower() == ex["label"].lower():
            correct += 1
        else:
            consistent[key] = False
    return correct / len(examples), sum(consistent.values()) / len(consistent)


def test_the_written_csv_scores_officially_as_the_metric_reports(tmp_path):
    # Sentences (split-set--sentence): dev-850--0 (pairs 0, 1, 2), dev-850--1 (pairs 0, 1), dev-851--0,
    # dev-850--07 (a leading zero: its own sentence for the official string comparison), and test1-850--0
    # (another split's prefix in the same file: also its own sentence).
    rows = [
        ("dev-850-0-0", "True", 1), ("dev-850-1-0", "False", 1), ("dev-850-2-0", "True", 1),  # one wrong
        ("dev-850-0-1", "False", 0), ("dev-850-1-1", "True", 1),  # all right
        ("dev-851-0-0", "True", 0),  # wrong
        ("dev-850-3-07", "False", 0),  # right
        ("test1-850-0-0", "True", 1),  # right
    ]
    gold = tmp_path / "dev.json"
    gold.write_text("".join(json.dumps({"identifier": i, "label": lab, "sentence": "s"}) + "\n" for i, lab, _ in rows))
    task = NLVR2Task("/nonexistent")
    metric = task.metric()
    ids = [i for i, _, _ in rows]
    labels = torch.tensor([int(lab == "True") for _, lab, _ in rows])
    logits = torch.nn.functional.one_hot(torch.tensor([pred for _, _, pred in rows]), 2).float()
    csv_rows = []
    for part in (slice(0, 3), slice(3, 8)):  # two batches, splitting sentence dev-850--0's pairs
        batch = {"labels": labels[part], "question_ids": ids[part]}
        task.update_metric(metric, logits[part], batch)
        csv_rows += task.prediction_rows(logits[part], batch)
    task.write_predictions(csv_rows, tmp_path / "predictions.csv")
    reported = {k: v.item() for k, v in metric.compute().items()}
    # 6 of 8 lines right; sentences right: dev-850--1, dev-850--07, test1-850--0 = 3 of 5.
    assert reported == pytest.approx({"": 6 / 8, "consistency": 3 / 5})
    assert official_metrics(tmp_path / "predictions.csv", gold) == pytest.approx((6 / 8, 3 / 5))


def test_train_then_eval_writes_metrics_and_the_official_csv(tmp_path):
    root = write_nlvr2(tmp_path / "nlvr2")
    done = train_then_eval(["+experiment=nlvr2", f"task.root={root}", *FAST], "dev", tmp_path,
                           train_args=["training.attention_stats=true", "training.ve_dropout=0.3"])
    run, out = done.run, done.out
    metrics = done.train_metrics
    assert {"val/acc", "val/acc_consistency", "test/acc", "test/acc_consistency", "val/majority_acc"} <= set(metrics)
    # Attention statistics cover both images' tokens, grouped by encoder.
    stats = json.loads((run / "attention" / "val" / "attention.json").read_text())
    assert {"clip_tiny", "dino_tiny"} <= set(stats["groups"])

    lines = (out / "predictions.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [row[0] for row in DEV]
    assert {line.split(",")[1] for line in lines} <= {"True", "False"}
    accuracy, consistency = official_metrics(out / "predictions.csv", root / "dev.json")
    metrics = done.eval_metrics
    assert metrics["dev/acc"] == pytest.approx(accuracy)
    assert metrics["dev/acc_consistency"] == pytest.approx(consistency)


def test_causal_trace_labels_each_images_tokens(tmp_path):
    """Causal tracing on a two-image checkpoint: the report's positions say which image a visual token is
    from, and restoring every position still gives the clean run's score exactly."""
    root = write_nlvr2(tmp_path / "nlvr2")
    args = ["+experiment=nlvr2", f"task.root={root}", *FAST]
    run_dir, out = tmp_path / "train_run", tmp_path / "trace"
    train_one_epoch(args, run_dir, tmp_path)
    traced = run("eval.py", [*args, "mode=causal_trace", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                             "split=dev", "analysis.causal_trace.corrupt=encoder:clip_tiny",
                             "analysis.causal_trace.min_effect=-1", f"hydra.run.dir={out}"], tmp_path)
    assert traced.returncode == 0, traced.stderr[-4000:]
    results = json.loads((out / "causal_trace" / "results.json").read_text())
    positions = results["positions"]
    assert positions[:2] == ["[CLS]", "text 0"]
    for image in ("img0", "img1"):
        assert f"{image} clip_tiny[0]" in positions and f"{image} dino_tiny[0]" in positions
    visual = [p for p in positions if p.startswith("img")]
    assert visual == sorted(visual, key=lambda p: p.split(" ")[0])  # image 0's tokens, then image 1's
    assert results["num_pairs"] == len(DEV) and results["restore_all_exact"] and results["restore_none_exact"]
