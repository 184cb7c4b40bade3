import re
from collections import Counter

import pytest
import timm.data
import torch
from PIL import Image
from transformers import BertTokenizerFast

import fusion.data.module
from fusion.data.images import load_image
from fusion.data.module import FusionDataModule, VLCollator, VLDataset
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


def test_each_image_is_decoded_once_per_sample_whatever_the_number_of_encoders(tmp_path, monkeypatch):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (40, 30), (60 * i, 30, 90)).save(paths[-1])
    # Two examples share an image pair (NLVR2: two sentences about one pair): still decoded per sample.
    pairs = [(0, 1), (2, 3), (0, 1)]
    examples = [
        Example(f"q{k}", f"k{a}", paths[a], "what color is the circle?", 1, more_images=((f"k{b}", paths[b]),))
        for k, (a, b) in enumerate(pairs)
    ]
    decoded = []

    def counting_load_image(path):
        decoded.append(path)
        return load_image(path)

    monkeypatch.setattr(fusion.data.module, "load_image", counting_load_image)
    ds = VLDataset(examples, _transforms(), _TwoImageTask(tmp_path))
    assert len(ds.transforms) == 2
    for index, (a, b) in enumerate(pairs):
        decoded.clear()
        item = ds[index]
        assert decoded == [paths[a], paths[b]]  # once per image, not once per (image, encoder)
        assert item["images"]["a"].shape[0] == item["images"]["b"].shape[0] == 2
    decoded.clear()
    for index in range(len(ds)):
        ds[index]
    assert Counter(decoded) == {paths[0]: 2, paths[1]: 2, paths[2]: 1, paths[3]: 1}


# ---- feature caches in the data path --------------------------------------------------------------
def _tiny_encoders():
    from fusion.encoders.vision import TimmEncoder

    kwargs = {"embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32, "patch_size": 16}
    return {
        "a": TimmEncoder("a", "vit_base_patch16_clip_224.openai", init_seed=0, model_kwargs=kwargs),
        "b": TimmEncoder("b", "vit_base_patch16_224.dino", init_seed=1, model_kwargs=kwargs),
    }


def _module(encoders, task, tokenizer_dir):
    from fusion.encoders.text import TextEncoder, build_tiny_bert
    from fusion.model.transformer import FusionModel
    from fusion.training.module import FusionLitModule

    torch.manual_seed(0)
    text = TextEncoder(build_tiny_bert(tokenizer_dir))

    def fusion(**dims):
        return FusionModel(**dims, width=32, depth=1, num_heads=2, dropout=0.0)

    return FusionLitModule(encoders, text, task, fusion=fusion, attention_stats=False).eval(), text


@pytest.mark.parametrize(("dtype", "atol"), [("float32", 1e-5), ("float16", 1e-2)])
def test_cached_features_give_the_model_the_same_output(tmp_path, dtype, atol):
    from fusion.data.cache.settings import CacheSettings

    task = ShapesTask(tmp_path / "shapes", num_train=6, num_val=5, num_test=3)
    encoders = _tiny_encoders()
    module, text = _module(encoders, task, tmp_path / "bert")
    transforms = {n: e.preprocess.transform() for n, e in encoders.items()}
    online = FusionDataModule(task, transforms, text.tokenizer, batch_size=5)
    cached = FusionDataModule(
        task, transforms, text.tokenizer, batch_size=5, encoders=encoders,
        cache=CacheSettings(tmp_path / "cache", dtype=dtype, num_workers=0),
    )
    for dm in (online, cached):
        dm.prepare_data()
        dm.setup("fit")
    plain, from_cache = next(iter(online.val_dataloader())), next(iter(cached.val_dataloader()))
    assert from_cache["images"] == {} and set(from_cache["features"]) == {"a", "b"}
    assert from_cache["features"]["a"].dtype == getattr(torch, dtype)
    assert from_cache["features"]["a"].shape == (5, encoders["a"].num_tokens, 32)
    with torch.no_grad():
        expected, got = module(plain)[0], module(from_cache)[0]
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    # The cache holds every image of the splits in use, each once.
    images = {e.image_key for split in task.splits for e in task.examples(split)}
    assert sorted(cached.caches["a"].keys) == sorted(images)


def test_cached_features_through_two_loader_workers_and_two_images(tmp_path, tokenizer):
    from fusion.data.cache import ensure_cache

    encoders = _tiny_encoders()
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.new("RGB", (40, 40), (60 * i, 30, 200 - 40 * i)).save(paths[-1])
    examples = [
        Example(f"q{i}", f"k{i}", paths[i], "what color is the circle?", 1, more_images=((f"k{3 - i}", paths[3 - i]),))
        for i in range(4)
    ]
    images = {f"k{i}": p for i, p in enumerate(paths)}
    caches = {n: ensure_cache(e, images, tmp_path / "c", dtype="float32", num_workers=0) for n, e in encoders.items()}
    loader = torch.utils.data.DataLoader(
        VLDataset(examples, {}, _TwoImageTask(tmp_path)), batch_size=2, num_workers=2,
        collate_fn=VLCollator(tokenizer, 16, caches),
    )
    batches = list(loader)
    assert [b["image_keys"] for b in batches] == [[("k0", "k3"), ("k1", "k2")], [("k2", "k1"), ("k3", "k0")]]
    feats = batches[1]["features"]["b"]
    assert feats.shape == (2, 2, encoders["b"].num_tokens, 32)
    pixels = encoders["b"].preprocess.transform()(load_image(paths[0]))
    with torch.no_grad():
        torch.testing.assert_close(feats[1, 1], encoders["b"](pixels[None])[0], atol=1e-5, rtol=0)


def test_a_complete_cache_needs_no_image_files_and_pixels_need_every_one(tmp_path):
    from fusion.data.cache.settings import CacheSettings

    task = ShapesTask(tmp_path / "shapes", num_train=6, num_val=5, num_test=3)
    encoders = _tiny_encoders()
    transforms = {n: e.preprocess.transform() for n, e in encoders.items()}
    _, text = _module(encoders, task, tmp_path / "bert")

    def datamodule(cache_dir=None):
        cache = CacheSettings(cache_dir, dtype="float32", num_workers=0) if cache_dir else None
        dm = FusionDataModule(task, transforms, text.tokenizer, batch_size=5, encoders=encoders, cache=cache)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    datamodule(tmp_path / "cache")  # builds the caches from the images
    for path in task.data_dir.rglob("*.png"):  # e.g. training on a node that has the caches, not the images
        path.unlink()
    batch = next(iter(datamodule(tmp_path / "cache").val_dataloader()))
    assert batch["images"] == {} and set(batch["features"]) == {"a", "b"}

    def missing(split):
        questions = re.escape(str(task.questions_path(split)))
        return rf"image file not found: {task.data_dir}\S+\.png \(referred to by {questions}: question_id '\S+'\)"

    with pytest.raises(FileNotFoundError, match=missing("val")):  # pixels for the encoders: named as the loader is made
        datamodule().val_dataloader()
    with pytest.raises(FileNotFoundError, match=rf"{missing('train')}; 5 more image file\(s\)"):  # a cache to build
        datamodule(tmp_path / "other_cache")


def test_fit_reads_every_split_before_the_first_training_step(tmp_path):
    """A broken test split stops fit before training, naming the split and the file (not after the last epoch)."""
    import pytorch_lightning as pl

    task = ShapesTask(tmp_path / "shapes", num_train=4, num_val=2, num_test=2)
    task.prepare_data()
    broken = task.data_dir / "test_questions.json"
    broken.write_text('[{"question_id": "test_000000_0",\n')  # cut short, as by a full disk
    encoders = _tiny_encoders()
    module, text = _module(encoders, task, tmp_path / "bert")
    dm = FusionDataModule(task, {n: e.preprocess.transform() for n, e in encoders.items()}, text.tokenizer,
                          batch_size=2)
    steps = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            steps.append(1)

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[CountSteps()])
    with pytest.raises(ValueError, match=rf"{re.escape(str(broken))} \(shapes questions of split 'test'\) is not "
                       "valid JSON"):
        trainer.fit(module.train(), datamodule=dm)
    assert steps == []
