"""Flickr30k retrieval: the Karpathy-split loader, its errors, and train.py / eval.py end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from entrypoints import FAST, train_then_eval
from PIL import Image

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


# ---- train.py / eval.py as a user runs them -----------------------------------------------------


def test_train_then_eval_writes_recalls_and_the_rankings(tmp_path):
    root = write_flickr30k(tmp_path / "f30k")
    done = train_then_eval(["+experiment=flickr30k", f"task.root={root}", *FAST], "test", tmp_path,
                           train_args=["model.rerank_k=2"], eval_args=["model.rerank_k=3"])
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
    # The file scores as the logged metric at R@1 (no ties among float scores here).
    t2i_r1 = sum(p["images"][0] == p["caption_id"].split("#")[0] for p in predictions["text_to_image"]) / len(captions)
    i2t_r1 = sum(p["captions"][0].split("#")[0] == p["image"] for p in predictions["image_to_text"]) / len(names)
    assert metrics["test/t2i_r1"] == pytest.approx(t2i_r1)
    assert metrics["test/i2t_r1"] == pytest.approx(i2t_r1)
