"""NLVR v1: six examples per line, validation carved by directory, accuracy/consistency, train.py / eval.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from entrypoints import FAST, train_then_eval
from PIL import Image

from fusion.tasks.nlvr import NLVRTask

ROOT = Path(__file__).resolve().parents[1]

# (identifier, directory, label): presentations of one sentence share a directory, as in the release.
TRAIN = [("10-0", "0", "true"), ("10-1", "0", "false"), ("11-0", "1", "true"), ("11-2", "1", "true"),
         ("12-0", "2", "false"), ("12-3", "2", "false")]
DEV = [("20-0", "0", "true"), ("20-1", "0", "false")]
TEST = [("30-0", "0", "false"), ("31-0", "0", "true")]


def write_nlvr(root: Path, splits: dict[str, list[tuple[str, str, str]]] | None = None, flat: bool = False) -> Path:
    """A small NLVR in the official layout: <split>/<split>.json and <split>/images/<dir>/<split>-<id>-<n>.png."""
    for split, statements in (splits or {"train": TRAIN, "dev": DEV, "test": TEST}).items():
        lines = []
        for identifier, directory, label in statements:
            lines.append(
                json.dumps(
                    {"sentence": f"there is a box with {identifier} black items", "label": label,
                     "identifier": identifier, "directory": directory, "evals": {"r0": label},
                     "structured_rep": [[{"x_loc": 1, "y_loc": 2, "type": "circle", "color": "Black", "size": 10}]]}
                )
            )
            folder = root / split / "images" / directory
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(6):
                shade = 40 * n if label == "true" else 255 - 40 * n
                Image.new("RGB", (60, 12), (shade, shade, 255)).save(folder / f"{split}-{identifier}-{n}.png")
        json_path = root / f"{split}.json" if flat else root / split / f"{split}.json"
        json_path.write_text("\n".join(lines) + "\n")
    return root


def test_each_line_gives_six_examples_named_as_the_official_images(tmp_path):
    root = write_nlvr(tmp_path / "nlvr")
    task = NLVRTask(root, val_split="dev", val_from_train=0)
    task.prepare_data()
    dev = task.examples("dev")
    assert len(dev) == 6 * len(DEV)
    assert [e.question_id for e in dev[:6]] == [f"dev-20-0-{n}" for n in range(6)]
    ex = dev[7]
    assert ex.image_path == root / "dev" / "images" / "0" / "dev-20-1-1.png" and ex.image_path.is_file()
    assert ex.image_key == "nlvr/dev/0/dev-20-1-1"
    assert task.answers[ex.label] == "false" and {e.label for e in dev[:6]} == {task.answers.index("true")}
    assert ex.question == "there is a box with 20-1 black items"


def test_json_directly_under_root_also_works(tmp_path):
    root = write_nlvr(tmp_path / "nlvr", {"dev": DEV}, flat=True)
    assert len(NLVRTask(root, val_from_train=0).examples("dev")) == 12


def test_val_from_train_holds_out_whole_directories_deterministically(tmp_path):
    root = write_nlvr(tmp_path / "nlvr")
    task = NLVRTask(root, val_from_train=0.3)
    train, val = task.examples("train"), task.examples("val")
    heldout = task.heldout_directories()
    assert len(heldout) == 1  # round(0.3 * 3 directories)
    assert {e.image_path.parent.name for e in val} == heldout
    assert not heldout & {e.image_path.parent.name for e in train}
    assert sorted(e.question_id for e in train + val) == sorted(e.question_id for e in NLVRTask(
        root, val_split="dev", val_from_train=0).examples("train"))
    # Every presentation of a sentence lands on one side.
    sentences = lambda examples: {e.question_id.split("-")[1] for e in examples}  # noqa: E731
    assert not sentences(train) & sentences(val)
    again = NLVRTask(root, val_from_train=0.3)
    assert [e.question_id for e in again.examples("val")] == [e.question_id for e in val]
    assert len(NLVRTask(root, val_from_train=0.9).heldout_directories()) == 2  # never all of train
    assert len(NLVRTask(root, val_from_train=0.01).heldout_directories()) == 1  # never none


def test_val_from_train_errors(tmp_path):
    root = write_nlvr(tmp_path / "nlvr", {"train": [("10-0", "0", "true"), ("10-1", "0", "false")]})
    with pytest.raises(ValueError, match=r"train\.json has images in only 1 directory; set task.val_from_train=0"):
        NLVRTask(root, val_from_train=0.5).examples("val")
    with pytest.raises(FileNotFoundError, match=r"val\.json not found.*set task.val_from_train > 0"):
        NLVRTask(root, val_from_train=0).check_split("val")
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="val_from_train must be a number in"):
            NLVRTask(root, val_from_train=bad)
    with pytest.raises(ValueError, match="needs val_split to differ from train_split"):
        NLVRTask(root, val_split="train", val_from_train=0.1)


@pytest.mark.parametrize(
    ("line", "replacement", "message"),
    [
        (2, {"label": "maybe"}, r"line 2: label 'maybe' is not one of false, true"),
        (1, {"identifier": "1572"}, r"line 1: identifier '1572' is not of the form <sentence>-<position>"),
        (2, {"directory": None}, r"line 2: missing field 'directory'"),
        (1, {"sentence": 7}, r"line 1: sentence 7 is not a string"),
        # Every NLVR file is labelled: no line may lack its label.
        (2, {"label": None}, r"line 2: missing field 'label'"),
    ],
)
def test_malformed_lines_name_file_line_and_expectation(tmp_path, line, replacement, message):
    root = write_nlvr(tmp_path / "nlvr", {"dev": DEV})
    path = root / "dev" / "dev.json"
    lines = path.read_text().splitlines()
    row = json.loads(lines[line - 1])
    for key, value in replacement.items():
        if value is None:
            del row[key]
        else:
            row[key] = value
    lines[line - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"dev\.json " + message):
        NLVRTask(root, val_from_train=0).examples("dev")


def test_a_missing_image_is_named_with_the_line_that_refers_to_it(tmp_path):
    root = write_nlvr(tmp_path / "nlvr")
    image = root / "dev" / "images" / "0" / "dev-20-1-3.png"
    image.unlink()
    where = r".*dev\.json line 2"
    with pytest.raises(FileNotFoundError, match=rf"image file not found: {image} \(referred to by {where}\)"):
        NLVRTask(root, val_from_train=0).check_images("dev")
    # A validation split carved from train points into train's file.
    task = NLVRTask(root, val_from_train=0.3)
    (directory,) = task.heldout_directories()
    line, (identifier, _, _) = next((n, s) for n, s in enumerate(TRAIN, start=1) if s[1] == directory)
    image = root / "train" / "images" / directory / f"train-{identifier}-0.png"
    image.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{image} \(referred to by .*train\.json line {line}\)"):
        task.check_images("val")


def _update(task: NLVRTask, metric, stems: list[str], wrong: set[str]) -> None:
    """Feed examples named by their image stems, all labelled true, predicted wrong for ``wrong``."""
    labels = torch.ones(len(stems), dtype=torch.long)
    preds = torch.tensor([0 if s in wrong else 1 for s in stems])
    task.update_metric(metric, torch.nn.functional.one_hot(preds, 2).float(), {"labels": labels, "question_ids": stems})


def test_consistency_needs_every_image_of_every_presentation_right():
    task = NLVRTask("/nonexistent")
    metric = task.metric()
    a = [f"dev-5-0-{n}" for n in range(6)]  # one image wrong -> inconsistent
    b = [f"dev-7-{m}-{n}" for m in range(2) for n in range(6)]  # two presentations, all right -> consistent
    c = [f"dev-8-0-{n}" for n in range(6)]  # all wrong
    # Sentences are split across batches, as a loader does.
    _update(task, metric, a[:4] + b[:3], wrong={"dev-5-0-2"})
    _update(task, metric, a[4:] + b[3:] + c, wrong=set(c))
    out = {k: v.item() for k, v in metric.compute().items()}
    assert out[""] == pytest.approx((5 + 12) / 24)
    assert out["consistency"] == pytest.approx(1 / 3)
    metric.reset()
    _update(task, metric, b, wrong={"dev-7-1-5"})  # a wrong image in another presentation of the sentence
    assert metric.compute()["consistency"].item() == 0.0


# ---- train.py / eval.py as a user runs them -----------------------------------------------------



def official_image_metrics(predictions_csv: Path, gold_json: Path) -> tuple[float, float]:
    """Precision (accuracy) and consistency as the official metrics_images.py computes them."""
    predictions = {}
    for line in predictions_csv.read_text().splitlines():
        name, value = line.strip().split(",")
        predictions["-".join(name.split(".")[0].split("-")[1:])] = value
    examples = [json.loads(line) for line in gold_json.read_text().splitlines() if line]
    assert len(predictions) == 6 * len(examples)
    correct, consistent = 0, {}
    for ex in examples:
        sentence = ex["identifier"].split("-")[0]
        consistent.setdefault(sentence, True)
        for n in range(6):
            if predictions[f"{ex['identifier']}-{n}"].lower() == ex["label"].lower():
                correct += 1
            else:
                consistent[sentence] = False
    return correct / (6 * len(examples)), sum(consistent.values()) / len(consistent)


def test_the_written_csv_scores_officially_as_the_metric_reports(tmp_path):
    # Lines (identifier, label); sentence = the identifier's first field, compared as a string.
    lines = [("5-0", "true"), ("5-1", "false"), ("7-0", "true"), ("07-1", "false"), ("8-0", "true")]
    gold = tmp_path / "dev.json"
    gold.write_text("".join(json.dumps({"identifier": i, "label": lab, "sentence": "s", "directory": "0"}) + "\n"
                            for i, lab in lines))
    # Wrong images: one of 5-1 (sentence 5 inconsistent, although 5-0 is all right), all of 8-0.
    wrong = {"dev-5-1-3"} | {f"dev-8-0-{n}" for n in range(6)}
    stems = [f"dev-{i}-{n}" for i, _ in lines for n in range(6)]
    labels = torch.tensor([int(lab == "true") for _, lab in lines for _ in range(6)])
    preds = torch.where(torch.tensor([s in wrong for s in stems]), 1 - labels, labels)
    logits = torch.nn.functional.one_hot(preds, 2).float()
    task = NLVRTask("/nonexistent")
    metric = task.metric()
    rows = []
    for part in (slice(0, 8), slice(8, 30)):  # two batches, splitting the first line's images
        batch = {"labels": labels[part], "question_ids": stems[part]}
        task.update_metric(metric, logits[part], batch)
        rows += task.prediction_rows(logits[part], batch)
    task.write_predictions(rows, tmp_path / "predictions.csv")
    reported = {k: v.item() for k, v in metric.compute().items()}
    # 30 images, 7 wrong; sentences "5", "7", "07", "8": "7" and "07" (two sentences as strings) consistent.
    assert reported == pytest.approx({"": 23 / 30, "consistency": 2 / 4})
    assert official_image_metrics(tmp_path / "predictions.csv", gold) == pytest.approx((23 / 30, 2 / 4))
    with pytest.raises(ValueError, match="question id 'dev-5-0' is not of the form <split>-<sentence>-<position>-<n>"):
        task.update_metric(metric, logits[:1], {"labels": labels[:1], "question_ids": ["dev-5-0"]})


def test_train_then_eval_writes_metrics_and_the_official_csv(tmp_path):
    root = write_nlvr(tmp_path / "nlvr")
    done = train_then_eval(["+experiment=nlvr", f"task.root={root}", "task.val_from_train=0.3", *FAST], "dev", tmp_path)
    metrics = done.train_metrics
    assert {"val/acc", "val/acc_consistency", "test/acc", "test/acc_consistency", "val/majority_acc"} <= set(metrics)
    assert list((done.run / "checkpoints").glob("epoch_*.ckpt")), "the checkpoint callback monitors val/acc"

    out = done.out
    lines = (out / "predictions.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"dev-{i}-{n}.png" for i, _, _ in DEV for n in range(6)]
    assert {line.split(",")[1] for line in lines} <= {"true", "false"}
    # The official script's numbers from the written file match the logged metrics.
    accuracy, consistency = official_image_metrics(out / "predictions.csv", root / "dev" / "dev.json")
    metrics = done.eval_metrics
    assert metrics["dev/acc"] == pytest.approx(accuracy)
    assert metrics["dev/acc_consistency"] == pytest.approx(consistency)
