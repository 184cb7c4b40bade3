"""Zoo pretraining data: generated scenes or an image folder, with clear errors for a bad folder."""

import pytest
import torch
from PIL import Image

from fusion.zoo.data import ImageFolderDataset, ZooDataModule


def _folder(root, classes=("a", "b"), per_class=3, captions=True):
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20, 30), (40 * i, 0, 0)).save(root / cls / f"{i}.png")
            if captions:
                (root / cls / f"{i}.txt").write_text(f"a red thing number {i}\n")
    return root


def test_folder_items_carry_captions_and_one_hot_classes(tmp_path):
    ds = ImageFolderDataset(_folder(tmp_path), needs=("captions", "classes"))
    assert len(ds) == 6 and ds.classes == ["a", "b"] and ds.label_groups == {"class": 2}
    item = ds[4]
    assert item["image"].mode == "RGB" and item["caption"] == "a red thing number 1"
    assert torch.equal(item["targets"]["class"], torch.tensor([0, 1]))


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ImageFolderDataset(tmp_path / "empty")
    root = _folder(tmp_path / "nocap", captions=False)
    with pytest.raises(FileNotFoundError, match=r"0\.txt"):
        ImageFolderDataset(root, needs=("captions",))
    Image.new("RGB", (8, 8)).save(root / "flat.png")
    with pytest.raises(ValueError, match="flat.png"):
        ImageFolderDataset(root, needs=("classes",))
    (root / "a" / "broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(root)
    with pytest.raises(OSError, match="broken.png"):
        ds[ds.files.index(root / "a" / "broken.png")]


def test_datamodule_splits_a_folder_and_applies_the_recipe_transform(tmp_path):
    dm = ZooDataModule(
        transform=lambda item: {"size": torch.tensor(item["image"].size)},
        folder=_folder(tmp_path, per_class=5),
        val_fraction=0.2,
        batch_size=2,
    )
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["size"], torch.tensor([[20, 30], [20, 30]]))
    with pytest.raises(ValueError, match="val_fraction"):
        ZooDataModule(transform=dict, val_fraction=1.5)


def test_folder_smaller_than_a_batch_is_refused_naming_folder_count_and_batch_size(tmp_path):
    folder = _folder(tmp_path / "few", classes=("a",), per_class=6)
    # 6 images, 1 held out for val: 5 training images never fill one batch of 8 (training drops the rest).
    with pytest.raises(ValueError, match=r"few'.*6 image\(s\), 5 for training.*batch_size=8"):
        ZooDataModule(transform=dict, folder=folder, batch_size=8)
    assert len(ZooDataModule(transform=dict, folder=folder, batch_size=5).train_set) == 5
