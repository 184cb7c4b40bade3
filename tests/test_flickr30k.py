"""Flickr30k retrieval: the Karpathy-split loader, its errors, and train.py / eval.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from entrypoints import FAST, train_then_eval
from PIL import Image

from fusion.metrics.ranking import RetrievalRecall, rerank
from fusion.tasks.flickr30k import Flickr30kTask

SPLITS = {"train": 6, "val": 3, "test": 4}
WORDS = ("dog", "cat", "man", "woman", "child", "bike", "car", "ball", "tree", "boat", "horse", "bird", "house")


def write_flickr30k(root: Path, splits: dict[str, int] | None = None) -> Path:
    """A small Flickr30k in the official layout: dataset_flickr30k.json (Karpathy) and flickr30k_images/."""
    images_dir = root / "flickr30k_images"
    images_dir.mkdir(parents=True)
    images, n = [], 0
    for split, count in (splits or SPLITS).items():
        for _ in range(count):
            filename = f"{1000092795 + 7919 * n}.jpg"
            colour = ((37 * n) % 256, (91 * n) % 256, (150 + 13 * n) % 256)
            Image.new("RGB", (40, 30), colour).save(images_dir / filename)
            word = WORDS[n % len(WORDS)]
            raws = [f"a {word} in picture {n} number {j}" for j in range(5)]
            images.append(
                {
                    "filename": filename,
                    "imgid": n,
                    "split": split,
                    "sentids": list(range(5 * n, 5 * n + 5)),
                    "sentences": [
                        {"tokens": raw.split(), "raw": raw, "imgid": n, "sentid": 5 * n + j}
                        for j, raw in enumerate(raws)
                    ],
                }
            )
            n += 1
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return root


def test_examples_follow_the_file(tmp_path):
    root = write_flickr30k(tmp_path / "f30k")
    task = Flickr30kTask(root)
    task.prepare_data()
    data = json.loads((root / "dataset_flickr30k.json").read_text())["images"]
    test = task.examples("test")
    expected = [(img, j, s) for img in data if img["split"] == "test" for j, s in enumerate(img["sentences"])]
    assert len(test) == 5 * SPLITS["test"] == len(expected)
    for ex, (img, j, sentence) in zip(test, expected, strict=True):
        assert ex.question_id == f"{img['filename']}#{j}"
        assert ex.question == sentence["raw"]
        assert ex.image_key == f"flickr30k/{Path(img['filename']).stem}"
        assert ex.image_path == root / "flickr30k_images" / img["filename"]
        assert task.answers[ex.label] == "match"
    assert task.splits == ("train", "val", "test") and task.answers == ["no_match", "match"]
    assert task.majority_accuracy("test") is None
    assert task.image_name(test[0].image_key) == expected[0][0]["filename"]


def test_restval_joins_train_only_when_asked(tmp_path):
    root = write_flickr30k(tmp_path / "f30k", {"train": 2, "restval": 3, "test": 1})
    assert len(Flickr30kTask(root).examples("train")) == 10
    assert len(Flickr30kTask(root, restval_in_train=True).examples("train")) == 25
    assert len(Flickr30kTask(root, restval_in_train=True).examples("restval")) == 15


def _corrupt(root: Path, edit) -> None:
    path = root / "dataset_flickr30k.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["images"][2].pop("filename"), r"images\[2\]: missing key 'filename' \(keys present: imgid"),
        (lambda d: d["images"][1].update(split="dev"),
         r"images\[1\] \(\d+\.jpg\): split 'dev' is not one of train, val, test, restval"),
        (lambda d: d["images"][3]["sentences"][4].pop("raw"),
         r"images\[3\] \(\d+\.jpg\) sentences\[4\]: missing key 'raw'"),
        (lambda d: d["images"][0]["sentences"][1].update(raw=""),
         r"images\[0\] \(\d+\.jpg\) sentences\[1\]: raw '' is not a non-empty string"),
        (lambda d: d["images"][0].update(sentences=[]),
         r"images\[0\] \(\d+\.jpg\): sentences is \[\]; expected a non-empty"),
        (lambda d: d["images"][4].update(filename=d["images"][0]["filename"]),
         r"images\[4\] .*listed twice .*images\[0\]"),
        (lambda d: d.pop("images"), r"expected a JSON object with an 'images' list, got a JSON object with keys"),
    ],
)
def test_malformed_file_names_file_key_and_expectation(tmp_path, edit, message):
    root = write_flickr30k(tmp_path / "f30k")
    _corrupt(root, edit)
    with pytest.raises(ValueError, match=r"dataset_flickr30k\.json:? " + message):
        Flickr30kTask(root).examples("train")


def test_not_json_missing_file_and_unknown_split_are_named(tmp_path):
    root = write_flickr30k(tmp_path / "f30k")
    with pytest.raises(ValueError, match=r"has no image with split 'dev'; splits present: test, train, val"):
        Flickr30kTask(root).check_split("dev")
    (root / "dataset_flickr30k.json").write_text('{"images": [\n{"filename": "a.jpg",,}]}')
    with pytest.raises(ValueError, match=r"dataset_flickr30k\.json: not valid JSON \(.*line 2 column"):
        Flickr30kTask(root).examples("train")
    with pytest.raises(FileNotFoundError, match=r"other\.json not found; expected the Karpathy split file"):
        Flickr30kTask(root, annotations="other.json").examples("train")


def test_missing_image_and_image_folder_are_named(tmp_path):
    root = write_flickr30k(tmp_path / "f30k")
    task = Flickr30kTask(root)
    victim = task.examples("val")[0].image_path
    victim.unlink()
    where = r"images\[6\]\.filename in .*json"
    with pytest.raises(FileNotFoundError, match=rf"image file not found: {victim} \(referred to by {where}\)"):
        Flickr30kTask(root).check_images("val")
    (root / "flickr30k_images").rename(root / "elsewhere")
    with pytest.raises(FileNotFoundError, match=r"flickr30k_images not found.*task.images_dir"):
        Flickr30kTask(root).prepare_data()


# ---- the metric against the standard protocol, read off the prediction file -----------------------


def official_recalls(predictions_json: Path, dataset_json: Path, split: str) -> dict[str, float]:
    """R@1/5/10 both ways and rsum (as fractions) by the Karpathy-split protocol of VSE++'s evaluation.py,
    read off the written top-10 lists: a caption hits at K when its image is among its first K images
    (divided by the split's captions); an image hits at K when any of its captions is among its first K
    captions (divided by the split's images)."""
    predictions = json.loads(predictions_json.read_text())
    images = [img for img in json.loads(dataset_json.read_text())["images"] if img["split"] == split]
    owner = {f"{img['filename']}#{n}": img["filename"] for img in images for n in range(len(img["sentences"]))}
    t2i, i2t = predictions["text_to_image"], predictions["image_to_text"]
    # One entry per caption and per image of the split (the scripts index the full score matrix).
    assert sorted(p["caption_id"] for p in t2i) == sorted(owner)
    assert sorted(p["image"] for p in i2t) == sorted(img["filename"] for img in images)
    out = {}
    for K in (1, 5, 10):
        out[f"t2i_r{K}"] = sum(owner[p["caption_id"]] in p["images"][:K] for p in t2i) / len(owner)
        out[f"i2t_r{K}"] = sum(any(owner[c] == p["image"] for c in p["captions"][:K]) for p in i2t) / len(images)
    out["rsum"] = sum(out.values())
    return out


def test_recalls_match_the_protocol_on_the_written_rankings_with_ties_and_ranks_at_k(tmp_path):
    root = write_flickr30k(tmp_path / "f30k", {"test": 4})
    task = Flickr30kTask(root)
    examples = task.examples("test")
    keys = list(dict.fromkeys(e.image_key for e in examples))
    # ITM scores (20 captions x 4 images); captions 5i..5i+4 describe image i.
    scores = torch.zeros(20, 4)
    scores[5:9, 0], scores[0, 0], scores[1:5, 0] = 0.9, 0.8, 0.1  # image 0: its best caption (0) 5th
    scores[5, 1] = scores[16, 1] = 0.7  # image 1: its caption 5 ties with the wrong caption 16 at the top
    scores[0:9, 2], scores[10, 2] = 0.6, 0.5  # image 2: caption 10 after 9 wrong ones: 10th
    scores[0:10, 3], scores[15, 3] = 0.6, 0.5  # image 3: caption 15 after 10 wrong ones: 11th
    positives = torch.arange(20)[:, None] // 5 == torch.arange(4)[None, :]
    # k >= every candidate: exhaustive ITM scoring (the constant first stage only picks the candidates).
    result = rerank(torch.zeros(20, 4), positives, k=100, scorer=lambda t, i: scores[t, i])
    metric = RetrievalRecall()
    metric.update("t2i", result.t2i_ranks)
    metric.update("i2t", result.i2t_ranks)
    reported = {k or "rsum": v.item() for k, v in metric.compute().items()}
    task.write_rankings(
        [e.question_id for e in examples],
        [[keys[j] for j in row] for row in result.t2i_top.tolist()],
        keys,
        [[examples[j].question_id for j in row] for row in result.i2t_top.tolist()],
        tmp_path / "predictions.json",
    )
    # By hand, ties against the model. Image -> text ranks 5, 2 (the tie), 10, 11: R@1 0, R@5 2/4, R@10 3/4.
    # Text -> image (4 images, so R@5 = R@10 = 1): R@1 only for captions 0 (0.8 beats 0.0, 0.6, 0.6),
    # 10 and 15 (0.5 against zeros); every other caption has a wrong image scoring at least its own.
    expected = {"t2i_r1": 3 / 20, "t2i_r5": 1.0, "t2i_r10": 1.0, "i2t_r1": 0.0, "i2t_r5": 0.5, "i2t_r10": 0.75}
    expected["rsum"] = sum(expected.values())
    assert reported == pytest.approx(expected)
    assert official_recalls(tmp_path / "predictions.json", root / "dataset_flickr30k.json", "test") == pytest.approx(
        expected
    )


# ---- train.py / eval.py as a user runs them -----------------------------------------------------


def test_train_then_eval_writes_recalls_and_the_rankings(tmp_path):
    root = write_flickr30k(tmp_path / "f30k")
    done = train_then_eval(["+experiment=flickr30k", f"task.root={root}", *FAST], "test", tmp_path,
                           train_args=["training.rerank_k=2"], eval_args=["training.rerank_k=3"])
    run, out = done.run, done.out
    metrics = done.train_metrics
    for stage in ("val", "test"):
        for key in ("rsum", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
            assert 0 <= metrics[f"{stage}/{key}"] <= (6 if key == "rsum" else 1), key
    # 3 validation images: every caption finds its image within 5 (and 10) of 3.
    assert metrics["val/t2i_r5"] == metrics["val/t2i_r10"] == 1.0
    assert list((run / "checkpoints").glob("epoch_*.ckpt")), "the checkpoint callback monitors val/rsum"

    metrics = done.eval_metrics
    recalls = ("rsum", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
    assert set(metrics) == {f"test/{p}{k}" for k in recalls for p in ("", "first_")}
    predictions = json.loads((out / "predictions.json").read_text())
    data = json.loads((root / "dataset_flickr30k.json").read_text())["images"]
    data = [img for img in data if img["split"] == "test"]
    names = [img["filename"] for img in data]
    captions = [f"{img['filename']}#{j}" for img in data for j in range(5)]
    assert [p["caption_id"] for p in predictions["text_to_image"]] == captions
    assert [p["image"] for p in predictions["image_to_text"]] == names
    for p in predictions["text_to_image"]:
        assert set(p) == {"caption_id", "images"} and sorted(p["images"]) == sorted(names)  # 4 images < 10
    for p in predictions["image_to_text"]:
        assert set(p) == {"image", "captions"} and len(set(p["captions"])) == 10 and set(p["captions"]) <= set(captions)
    # The file scores as the logged metrics, every recall, by the standard protocol.
    official = official_recalls(out / "predictions.json", root / "dataset_flickr30k.json", "test")
    assert {k: metrics[f"test/{k}"] for k in official} == pytest.approx(official)
