"""Hateful Memes: the loader, its errors, AUROC (ties, one class, no labels), and train.py / eval.py end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from entrypoints import FAST, train_then_eval
from PIL import Image

from fusion.tasks.hateful_memes import HatefulMemesTask

ROOT = Path(__file__).resolve().parents[1]


def write_memes(root: Path, sizes: dict[str, int] | None = None, unlabelled: tuple[str, ...] = ("test_seen",)) -> Path:
    """A small Hateful Memes in the official layout: <split>.jsonl and img/<id>.png (ids zero-padded to 5)."""
    (root / "img").mkdir(parents=True)
    meme_id = 1230
    for split, n in (sizes or {"train": 12, "dev_seen": 6, "test_seen": 6}).items():
        lines = []
        for j in range(n):
            meme_id += 1
            image = f"img/{meme_id:05d}.png"
            Image.new("RGB", (40, 40), (20 * j, 255 - 20 * j, 90)).save(root / image)
            row = {"id": meme_id, "img": image, "text": f"when the meme text says {j}"}
            if split not in unlabelled:
                row["label"] = j % 2
            lines.append(json.dumps(row))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_examples_follow_the_files_and_unlabelled_lines_get_minus_one(tmp_path):
    root = write_memes(tmp_path / "memes")
    task = HatefulMemesTask(root)
    task.prepare_data()
    assert task.splits == ("train", "dev_seen", "test_seen") and task.answers == ["not_hateful", "hateful"]
    first = json.loads((root / "dev_seen.jsonl").read_text().splitlines()[0])
    ex = task.examples("dev_seen")[0]
    assert ex.question_id == str(first["id"]) and ex.question == first["text"] and ex.label == first["label"]
    assert ex.image_key == f"hateful_memes/{first['img']}" and ex.image_path == root / first["img"]
    assert {e.label for e in task.examples("test_seen")} == {-1}
    assert {e.label for e in task.examples("train")} == {0, 1}


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (3, {"label": 2}, r"line 3: label 2 is not one of 0, 1"),
        (3, {"label": True}, r"line 3: label True is not one of 0, 1"),
        (1, {"img": None}, r"line 1: missing field 'img'"),
        (2, {"img": "/abs/01.png"}, r"line 2: img '/abs/01.png' is absolute; expected a path relative"),
        (4, {"id": 1.5}, r"line 4: id 1\.5 is not an integer or a string"),
        # Only a file without any label is unlabelled; a label dropped from a labelled file is an error.
        (3, {"label": None}, r"line 3: missing field 'label' while other lines have one"),
    ],
)
def test_malformed_lines_name_file_line_and_expectation(tmp_path, line, replacement, message):
    root = write_memes(tmp_path / "memes")
    path = root / "dev_seen.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[line - 1])
    for key, value in replacement.items():
        if value is None:
            del row[key]
        else:
            row[key] = value
    lines[line - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dev_seen\.jsonl " + message):
        HatefulMemesTask(root).examples("dev_seen")


def test_missing_split_file_is_named(tmp_path):
    root = write_memes(tmp_path / "memes")
    with pytest.raises(FileNotFoundError, match=r"dev_unseen\.jsonl not found; expected Hateful Memes"):
        HatefulMemesTask(root).check_split("dev_unseen")


def test_a_missing_image_is_named_with_the_line_that_refers_to_it(tmp_path):
    root = write_memes(tmp_path / "memes")
    image = root / json.loads((root / "dev_seen.jsonl").read_text().splitlines()[1])["img"]
    image.unlink()
    where = r".*dev_seen\.jsonl line 2"
    with pytest.raises(FileNotFoundError, match=rf"image file not found: {image} \(referred to by {where}\)"):
        HatefulMemesTask(root).check_images("dev_seen")


def _logits(probs: list[float]) -> torch.Tensor:
    """Two-way logits whose softmax gives P(hateful) = ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([torch.log1p(-p), torch.log(p)], dim=-1)


def _batch(labels: list[int]) -> dict:
    return {"labels": torch.tensor(labels), "question_ids": [str(i) for i in range(len(labels))]}


def _compute(probs_labels: list[tuple[list[float], list[int]]]) -> dict[str, float]:
    task = HatefulMemesTask("/nonexistent")
    metric = task.metric()
    for probs, labels in probs_labels:
        task.update_metric(metric, _logits(probs), _batch(labels))
    return {k: v.item() for k, v in metric.compute().items()}


def test_auroc_counts_ties_as_half_and_ignores_unlabelled():
    # Positives 0.9, 0.5; negatives 0.5, 0.2: pairs 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4. The unlabelled 0.99 is
    # left out (as a positive it would change nothing, as a negative it would cost two pairs).
    out = _compute([([0.9, 0.5, 0.99], [1, 1, -1]), ([0.5, 0.2], [0, 0])])
    assert out[""] == pytest.approx(0.875)
    # Decision at P > 0.5: 0.9 right, 0.5 -> not hateful (wrong), 0.5 and 0.2 right.
    assert out["acc"] == pytest.approx(0.75)


def test_auroc_is_nan_with_a_warning_when_a_class_is_absent():
    # torchmetrics' BinaryAUROC returns 0 here, which would read as a perfectly inverted ranking.
    with pytest.warns(UserWarning, match="AUROC is undefined: all 3 labelled examples are negative"):
        out = _compute([([0.3, 0.6, 0.1, 0.8], [0, 0, 0, -1])])
    assert math.isnan(out[""]) and out["acc"] == pytest.approx(2 / 3)
    with pytest.warns(UserWarning, match="all 1 labelled examples are positive"):
        assert math.isnan(_compute([([0.3], [1])])[""])
    with pytest.warns(UserWarning, match="without labelled examples"):
        out = _compute([([0.3, 0.7], [-1, -1])])
    assert math.isnan(out[""]) and math.isnan(out["acc"])


def test_metric_resets_between_epochs():
    task = HatefulMemesTask("/nonexistent")
    metric = task.metric()
    task.update_metric(metric, _logits([0.9, 0.1]), _batch([0, 1]))
    assert metric.compute()[""].item() == 0.0
    metric.reset()
    task.update_metric(metric, _logits([0.9, 0.1]), _batch([1, 0]))
    assert metric.compute()[""].item() == 1.0


def test_majority_baseline_is_the_auroc_of_a_constant(tmp_path):
    task = HatefulMemesTask(write_memes(tmp_path / "memes"))
    assert task.majority_accuracy("dev_seen") == 0.5
    assert task.majority_accuracy("test_seen") is None


def test_prediction_file_is_the_challenge_csv(tmp_path):
    task = HatefulMemesTask("/nonexistent")
    rows = task.prediction_rows(_logits([0.25, 0.75]), {"question_ids": ["1235", "42953"]})
    task.write_predictions(rows, tmp_path / "predictions.csv")
    lines = (tmp_path / "predictions.csv").read_text().splitlines()
    assert lines[0] == "id,proba,label"
    assert [line.split(",")[0::2] for line in lines[1:]] == [["1235", "0"], ["42953", "1"]]
    assert [float(line.split(",")[1]) for line in lines[1:]] == pytest.approx([0.25, 0.75])


def _auroc_by_pairs(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def challenge_scores(predictions_csv: Path, gold: dict[str, int]) -> tuple[float, float]:
    """AUROC and accuracy of a submission as the challenge scored it: ``roc_auc_score(gold, proba)``, which
    is the share of (hateful, not hateful) pairs ranked right with ties counting half, and the share of
    memes whose ``label`` column equals the gold label; every meme of the split needs one row."""
    with predictions_csv.open() as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(gold)
    ids = sorted(gold)
    auroc = _auroc_by_pairs([float(rows[i]["proba"]) for i in ids], [gold[i] for i in ids])
    return auroc, sum(int(rows[i]["label"]) == gold[i] for i in ids) / len(ids)


def test_the_submission_csv_scores_as_the_metric_reports_with_ties_and_a_half(tmp_path):
    # Logits (not hateful, hateful): equal rows give equal probabilities (ties), [0, 0] exactly 0.5.
    logits = torch.tensor([[0.0, 1.4], [0.0, 1.4], [0.0, 0.0], [0.9, 0.0], [0.9, 0.0], [2.2, 0.0]])
    gold = {"11": 1, "12": 0, "13": 1, "14": 0, "15": 1, "16": 0}
    ids, labels = list(gold), torch.tensor(list(gold.values()))
    task = HatefulMemesTask("/nonexistent")
    metric = task.metric()
    rows = []
    for part in (slice(0, 1), slice(1, 6)):  # two batches, splitting the tied pair
        batch = {"labels": labels[part], "question_ids": ids[part]}
        task.update_metric(metric, logits[part], batch)
        rows += task.prediction_rows(logits[part], batch)
    task.write_predictions(rows, tmp_path / "predictions.csv")
    reported = {k: v.item() for k, v in metric.compute().items()}
    # P(hateful): 11, 12 high (tied), 13 = 0.5, 14, 15 low (tied), 16 lowest. Hateful 11, 13, 15 against
    # 12, 14, 16: 11 -> 0.5 + 1 + 1, 13 -> 0 + 1 + 1, 15 -> 0 + 0.5 + 1: 6 of 9 pairs.
    # Labels (proba > 0.5): 1, 1, 0 (exactly 0.5 is not hateful), 0, 0, 0: right for 11, 14, 16 = 3 of 6.
    assert reported == pytest.approx({"": 6 / 9, "acc": 3 / 6})
    assert challenge_scores(tmp_path / "predictions.csv", gold) == pytest.approx((6 / 9, 3 / 6))


# ---- train.py / eval.py as a user runs them -----------------------------------------------------



def test_train_then_eval_writes_metrics_and_the_challenge_csv(tmp_path):
    root = write_memes(tmp_path / "memes")
    done = train_then_eval(["+experiment=hateful_memes", f"task.root={root}", *FAST], "dev_seen", tmp_path)
    metrics = done.train_metrics
    assert {"val/auroc", "val/auroc_acc", "val/loss", "val/majority_auroc"} <= set(metrics)
    assert list((done.run / "checkpoints").glob("epoch_*.ckpt")), "the checkpoint callback monitors val/auroc"
    # test_seen has no labels here: no test metrics (nor loss), and the run says why.
    assert not any(key.startswith("test/") for key in metrics), metrics
    assert "split test_seen has no labels: predictions only" in done.train.stdout + done.train.stderr

    with (done.out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    gold = [json.loads(line) for line in (root / "dev_seen.jsonl").read_text().splitlines()]
    assert list(rows[0]) == ["id", "proba", "label"]
    assert [r["id"] for r in rows] == [str(g["id"]) for g in gold]
    probs = [float(r["proba"]) for r in rows]
    assert all(0 <= p <= 1 for p in probs)
    assert [int(r["label"]) for r in rows] == [int(p > 0.5) for p in probs]
    # The submission file scores exactly as the logged metrics, AUROC and accuracy.
    metrics = done.eval_metrics
    auroc, accuracy = challenge_scores(done.out / "predictions.csv", {str(g["id"]): g["label"] for g in gold})
    assert metrics["dev_seen/auroc"] == pytest.approx(auroc, abs=1e-6)
    assert metrics["dev_seen/auroc_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["dev_seen/majority_auroc"] == 0.5
