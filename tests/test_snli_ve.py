"""SNLI-VE: the loader on official-format files, its errors, the metric, and train.py / eval.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from entrypoints import FAST, train_then_eval
from PIL import Image

from fusion.tasks.snli_ve import LABELS, SNLIVETask

ROOT = Path(__file__).resolve().parents[1]
IMAGE_IDS = ("1000092795", "10002456", "1000268201")


def write_snli_ve(root: Path, sizes: dict[str, int] | None = None) -> Path:
    """A small SNLI-VE in the official layout: snli_ve_<split>.jsonl and flickr30k_images/<id>.jpg."""
    images = root / "flickr30k_images"
    images.mkdir(parents=True)
    for i, image_id in enumerate(IMAGE_IDS):
        Image.new("RGB", (48, 36), (100 * i, 50, 200 - 90 * i)).save(images / f"{image_id}.jpg")
    for split, n in (sizes or {"train": 12, "dev": 6, "test": 6}).items():
        lines = []
        for j in range(n):
            image_id, label = IMAGE_IDS[j % 3], LABELS[(j // 3 + j) % 3]
            lines.append(
                json.dumps(
                    {
                        "Flickr30K_ID": image_id,
                        "pairID": f"{image_id}.jpg#{j}r1{label[0]}",
                        "captionID": f"{image_id}.jpg#{j}",
                        "sentence1": "Two dogs run on the grass.",
                        "sentence2": f"some animals are outside {j}",
                        "gold_label": label,
                    }
                )
            )
        (root / f"snli_ve_{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_examples_follow_the_files(tmp_path):
    root = write_snli_ve(tmp_path / "snli")
    task = SNLIVETask(root, val_split="dev")
    task.prepare_data()
    dev = task.examples("dev")
    assert len(dev) == 6 and task.splits == ("train", "dev", "test")
    first = json.loads((root / "snli_ve_dev.jsonl").read_text().splitlines()[0])
    ex = dev[0]
    assert ex.question_id == first["pairID"] and ex.question == first["sentence2"]
    assert ex.image_key == f"flickr30k/{first['Flickr30K_ID']}"
    assert ex.image_path == root / "flickr30k_images" / f"{first['Flickr30K_ID']}.jpg"
    assert task.answers[ex.label] == first["gold_label"] == ex.answer_type
    assert task.answers == task.answer_types == ["entailment", "neutral", "contradiction"]


def test_images_dir_may_be_absolute_and_is_checked(tmp_path):
    root = write_snli_ve(tmp_path / "snli")
    elsewhere = tmp_path / "flickr"
    (root / "flickr30k_images").rename(elsewhere)
    task = SNLIVETask(root, images_dir=str(elsewhere))
    task.prepare_data()
    assert task.examples("train")[0].image_path.parent == elsewhere
    with pytest.raises(FileNotFoundError, match=r"flickr30k_images not found.*task.images_dir"):
        SNLIVETask(root).prepare_data()


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (7, {"gold_label": "maybe"}, r"line 7: gold_label 'maybe' is not one of entailment, neutral, contradiction"),
        (2, {"sentence2": None}, r"line 2: missing field 'sentence2'"),
        (3, {"Flickr30K_ID": [1]}, r"line 3: Flickr30K_ID \[1\] is not a string or an integer"),
        (4, {"sentence2": "  "}, r"line 4: sentence2 is empty"),
        (5, "{not json", r"line 5: not valid JSON"),
        # Every SNLI-VE file is labelled: no line may lack its gold label.
        (6, {"gold_label": None}, r"line 6: missing field 'gold_label'"),
    ],
)
def test_malformed_lines_name_file_line_and_expectation(tmp_path, line, replacement, message):
    root = write_snli_ve(tmp_path / "snli")
    path = root / "snli_ve_train.jsonl"
    lines = path.read_text().splitlines()
    if isinstance(replacement, dict):
        row = json.loads(lines[line - 1])
        for key, value in replacement.items():
            if value is None:
                del row[key]
            else:
                row[key] = value
        lines[line - 1] = json.dumps(row)
    else:
        lines[line - 1] = replacement
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"snli_ve_train\.jsonl " + message):
        SNLIVETask(root).examples("train")


def test_missing_split_file_is_named(tmp_path):
    root = write_snli_ve(tmp_path / "snli")
    with pytest.raises(FileNotFoundError, match=r"snli_ve_val\.jsonl not found; expected SNLI-VE's JSON lines"):
        SNLIVETask(root).check_split("val")


def test_a_missing_image_is_named_with_the_first_line_that_refers_to_it(tmp_path):
    root = write_snli_ve(tmp_path / "snli")
    image = root / "flickr30k_images" / f"{IMAGE_IDS[1]}.jpg"
    image.unlink()
    where = r".*snli_ve_test\.jsonl line 2"
    with pytest.raises(FileNotFoundError, match=rf"image file not found: {image} \(referred to by {where}\)"):
        SNLIVETask(root).check_images("test")


def test_metric_reports_accuracy_overall_and_per_label():
    task = SNLIVETask("/nonexistent")
    metric = task.metric()
    labels = torch.tensor([0, 0, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0])
    batch = {"labels": labels, "answer_types": labels, "question_ids": list("abcde")}
    task.update_metric(metric, torch.nn.functional.one_hot(preds, 3).float(), batch)
    out = {k: round(v.item(), 6) for k, v in metric.compute().items()}
    assert out == {"": 0.6, "entailment": 0.5, "neutral": 1.0, "contradiction": 0.5}
    rows = task.prediction_rows(torch.nn.functional.one_hot(preds, 3).float(), batch)
    assert rows[1] == {"pairID": "b", "prediction": "neutral"}


def official_accuracy(predictions_json: Path, gold_jsonl: Path) -> dict[str, float]:
    """Accuracy as SNLI-VE is scored: the share of lines whose prediction (matched by pairID) equals
    gold_label, overall ("") and among the lines of each gold label present; every line needs a prediction."""
    predictions = {p["pairID"]: p["prediction"] for p in json.loads(predictions_json.read_text())}
    gold = [json.loads(line) for line in gold_jsonl.read_text().splitlines() if line]
    assert sorted(predictions) == sorted(g["pairID"] for g in gold)
    out = {}
    for label in ("", *LABELS):
        lines = [g for g in gold if label in ("", g["gold_label"])]
        if lines:
            out[label] = sum(predictions[g["pairID"]] == g["gold_label"] for g in lines) / len(lines)
    return out


def test_the_written_predictions_score_as_the_metric_reports(tmp_path):
    gold = [("p1", "entailment", 0), ("p2", "entailment", 1), ("p3", "neutral", 1), ("p4", "contradiction", 2),
            ("p5", "contradiction", 0), ("p6", "contradiction", 2), ("p7", "neutral", 2)]
    gold_file = tmp_path / "snli_ve_dev.jsonl"
    gold_file.write_text("".join(json.dumps({"pairID": i, "gold_label": g}) + "\n" for i, g, _ in gold))
    task = SNLIVETask("/nonexistent")
    metric = task.metric()
    labels = torch.tensor([LABELS.index(g) for _, g, _ in gold])
    logits = torch.nn.functional.one_hot(torch.tensor([p for _, _, p in gold]), 3).float()
    rows = []
    for part in (slice(0, 3), slice(3, 7)):
        batch = {"labels": labels[part], "answer_types": labels[part], "question_ids": [i for i, _, _ in gold[part]]}
        task.update_metric(metric, logits[part], batch)
        rows += task.prediction_rows(logits[part], batch)
    task.write_predictions(rows, tmp_path / "predictions.json")
    reported = {k: v.item() for k, v in metric.compute().items()}
    # Right: p1, p3, p4, p6 = 4 of 7; entailment 1 of 2, neutral 1 of 2, contradiction 2 of 3.
    expected = {"": 4 / 7, "entailment": 1 / 2, "neutral": 1 / 2, "contradiction": 2 / 3}
    assert reported == pytest.approx(expected)
    assert official_accuracy(tmp_path / "predictions.json", gold_file) == pytest.approx(expected)


# ---- train.py / eval.py as a user runs them -----------------------------------------------------



def test_train_then_eval_writes_metrics_and_the_prediction_file(tmp_path):
    root = write_snli_ve(tmp_path / "snli")
    done = train_then_eval(["+experiment=snli_ve", f"task.root={root}", *FAST], "dev", tmp_path)
    metrics = done.train_metrics
    for key in ("val/acc", "val/acc_entailment", "val/acc_contradiction", "test/acc", "val/majority_acc"):
        assert key in metrics, key
    assert list((done.run / "checkpoints").glob("epoch_*.ckpt")), "the checkpoint callback monitors val/acc"

    predictions = json.loads((done.out / "predictions.json").read_text())
    gold = [json.loads(line) for line in (root / "snli_ve_dev.jsonl").read_text().splitlines()]
    assert [p["pairID"] for p in predictions] == [g["pairID"] for g in gold]
    assert all(set(p) == {"pairID", "prediction"} and p["prediction"] in LABELS for p in predictions)
    # The prediction file scores exactly as the logged metrics, overall and per gold label.
    official = official_accuracy(done.out / "predictions.json", root / "snli_ve_dev.jsonl")
    reported = {"": done.eval_metrics["dev/acc"]} | {
        label: done.eval_metrics[f"dev/acc_{label}"] for label in LABELS if f"dev/acc_{label}" in done.eval_metrics
    }
    assert reported == pytest.approx(official)
