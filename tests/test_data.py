import pytest
import timm.data
import torch
from PIL import Image
from transformers import BertTokenizerFast

from fusion.data import FusionDataModule, VLCollator, VLDataset, load_image
from fusion.tasks.base import Example
from fusion.tasks.shapes import ShapesTask


def _transforms():
    return {
        "a": timm.data.create_transform(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3),
        "b": timm.data.create_transform(input_size=(3, 48, 48), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    }


@pytest.fixture
def tokenizer(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "color", "is", "the", "?"]))
    return BertTokenizerFast(vocab_file=str(vocab))


def _example(path, label=0):
    return Example("q1", "k1", path, "what color is the circle?", label, "color")


def test_dataset_gives_each_encoder_its_own_format(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 40), (255, 0, 0)).save(path)
    item = VLDataset([_example(path)], _transforms(), ShapesTask(tmp_path))[0]
    assert item["images"]["a"].shape == (3, 32, 32)
    assert item["images"]["b"].shape == (3, 48, 48)
    # Red normalised by each encoder's own mean/std.
    assert item["images"]["a"][0, 0, 0].item() == pytest.approx(1.0, abs=1e-3)
    assert item["images"]["b"][0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-2)


def test_unreadable_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        load_image(tmp_path / "nothere.png")


def test_collator_stacks_and_tokenizes(tmp_path, tokenizer):
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 64)).save(path)
    ds = VLDataset([_example(path, 0), _example(path, 3)], _transforms(), ShapesTask(tmp_path))
    batch = VLCollator(tokenizer, max_length=16)([ds[0], ds[1]])
    assert batch["images"]["b"].shape == (2, 3, 48, 48)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    assert batch["labels"].tolist() == [0, 3]
    assert batch["targets"].tolist() == [0, 3]  # the shapes task trains towards the label index
    assert batch["question_ids"] == ["q1", "q1"]


def test_datamodule_over_the_shapes_task(tmp_path, tokenizer):
    task = ShapesTask(tmp_path, num_train=8, num_val=4, num_test=4)
    dm = FusionDataModule(task, _transforms(), tokenizer, batch_size=5)
    dm.prepare_data()
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"]["a"].shape == (5, 3, 32, 32)
    assert len(dm.val_dataloader().dataset) == len(task.examples("val"))
    assert batch["answer_types"].dtype == torch.long


class _TwoImageTask(ShapesTask):
    images_per_example = 2


def test_two_images_per_example_each_decoded_once_and_transformed_per_encoder(tmp_path, tokenizer):
    left, right = tmp_path / "left.png", tmp_path / "right.png"
    Image.new("RGB", (64, 40), (255, 0, 0)).save(left)
    Image.new("RGB", (30, 50), (0, 0, 255)).save(right)
    ex = Example("q1", "k-left", left, "what color is the circle?", 1, more_images=(("k-right", right),))
    ds = VLDataset([ex, ex], _transforms(), _TwoImageTask(tmp_path))
    item = ds[0]
    assert item["images"]["a"].shape == (2, 3, 32, 32) and item["images"]["b"].shape == (2, 3, 48, 48)
    assert item["images"]["a"][0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-3)  # left is red
    assert item["images"]["a"][1, 2, 0, 0].item() == pytest.approx(1.0, abs=1e-3)  # right is blue
    assert item["image_key"] == ("k-left", "k-right")
    batch = VLCollator(tokenizer, max_length=16)([ds[0], ds[1]])
    assert batch["images"]["b"].shape == (2, 2, 3, 48, 48)
    assert batch["image_keys"] == [("k-left", "k-right")] * 2
    # An example with the wrong number of images is named.
    with pytest.raises(ValueError, match="example 'q1' of task 'shapes' has 1 images; the task expects 2"):
        VLDataset([_example(left)], _transforms(), _TwoImageTask(tmp_path))[0]
