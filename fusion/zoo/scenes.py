"""Generated pretraining scenes: several coloured shapes per image, a caption that names them, attribute targets.

The drawing is the shapes task's own (:func:`fusion.tasks.shapes.sample_scene` / ``render_scene``), so the zoo
encoders see the image distribution the shapes task asks about, but from a separate random stream
(``"zoo:<seed>:<index>"``): no pretraining image is a task image. Scene ``i`` of a seed is the same on every
run and machine and does not depend on the data set's length, so nothing has to be written to disk.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from fusion.tasks.shapes import COLORS, GRID, SHAPES, SceneObject, render_scene, sample_scene

__all__ = ["ATTRIBUTE_GROUPS", "Scene", "SceneDataset", "attribute_targets", "caption", "make_scene"]

CELLS = GRID * GRID
# Attribute groups the probes and the supervised recipe use, with their number of classes. ``shape`` and
# ``color`` are multi-hot presence vectors; ``count`` is the object count - 1; ``cell_color`` /
# ``cell_shape`` give, per grid cell (row-major), 0 = empty or 1 + the colour / shape index.
ATTRIBUTE_GROUPS: dict[str, int] = {
    "shape": len(SHAPES),
    "color": len(COLORS),
    "count": CELLS,
    "cell_color": 1 + len(COLORS),
    "cell_shape": 1 + len(SHAPES),
}
# Which groups are multi-hot (binary per class) rather than one class per image or per cell.
MULTI_HOT = frozenset({"shape", "color"})


@dataclass(frozen=True)
class Scene:
    """One generated example: the image, a caption naming every object, and the objects themselves."""

    image: Image.Image
    caption: str
    objects: tuple[SceneObject, ...]


def caption(objects: Sequence[SceneObject], rng: random.Random) -> str:
    """Name every object with its colour, shape and grid cell, in random order.

    E.g. ``"a blue square in the bottom left and a red circle in the top right"``. Every word is in the
    tiny text vocabulary (``fusion/encoders/assets/tiny_vocab.txt``). The order is random so that a text tower
    cannot read positions off word order alone.
    """
    if not objects:
        raise ValueError("a caption needs at least one object")
    parts = [f"a {o.color} {o.shape} in the {o.position}" for o in objects]
    rng.shuffle(parts)
    return " and ".join(parts)


def attribute_targets(objects: Sequence[SceneObject]) -> dict[str, Tensor]:
    """Integer targets of every group in :data:`ATTRIBUTE_GROUPS` (see there for their meaning).

    Shapes: ``shape`` (3,), ``color`` (5,) multi-hot; ``count`` () ; ``cell_color``, ``cell_shape`` (4,).
    """
    colors, shapes = list(COLORS), list(SHAPES)
    shape = torch.zeros(len(shapes), dtype=torch.long)
    color = torch.zeros(len(colors), dtype=torch.long)
    cell_color = torch.zeros(CELLS, dtype=torch.long)
    cell_shape = torch.zeros(CELLS, dtype=torch.long)
    for o in objects:
        shape[shapes.index(o.shape)] = 1
        color[colors.index(o.color)] = 1
        cell_color[o.cell] = 1 + colors.index(o.color)
        cell_shape[o.cell] = 1 + shapes.index(o.shape)
    return {
        "shape": shape,
        "color": color,
        "count": torch.tensor(len(objects) - 1),
        "cell_color": cell_color,
        "cell_shape": cell_shape,
    }


def make_scene(seed: int, index: int, image_size: int = 64, max_objects: int = CELLS) -> Scene:
    """Scene ``index`` of stream ``seed``: 1..max_objects shapes in distinct cells of the 2x2 grid."""
    # String seeds are hashed with SHA-512 by random.Random: stable across runs, machines and lengths.
    rng = random.Random(f"zoo:{seed}:{index}")
    objects = tuple(sample_scene(rng, image_size, max_objects))
    return Scene(image=render_scene(objects, image_size), caption=caption(objects, rng), objects=objects)


class SceneDataset(Dataset):
    """``length`` generated scenes of stream ``seed``; item ``i`` -> ``{"image", "caption", "targets"}``.

    ``image`` is an RGB PIL image, ``caption`` a string and ``targets`` the dict of
    :func:`attribute_targets`. Scenes are drawn on access (a 64 px scene takes well under a millisecond).
    """

    # The supervised recipe's classification heads: multi-hot presence of each shape and each colour.
    label_groups: dict[str, int] = {g: ATTRIBUTE_GROUPS[g] for g in ("shape", "color")}
    has_captions = True

    def __init__(self, length: int, seed: int = 0, image_size: int = 64, max_objects: int = CELLS) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"scenes: length must be an integer >= 1, got {length!r}")
        if not isinstance(max_objects, int) or not 1 <= max_objects <= CELLS:
            raise ValueError(f"scenes: max_objects must be an integer in [1, {CELLS}], got {max_objects!r}")
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"scenes: image_size must be an integer >= 32, got {image_size!r}")
        self.length = length
        self.seed = seed
        self.image_size = image_size
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"scene index {index} out of range for {self.length} scenes")
        scene = make_scene(self.seed, index, self.image_size, self.max_objects)
        return {"image": scene.image, "caption": scene.caption, "targets": attribute_targets(scene.objects)}

