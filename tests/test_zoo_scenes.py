"""Generated zoo scenes: captions name every object, targets match the objects, scenes are reproducible."""

import random

import numpy as np
import pytest

from fusion.encoders.text import TINY_VOCAB
from fusion.tasks.shapes import COLORS, SHAPES
from fusion.zoo.scenes import ATTRIBUTE_GROUPS, SceneDataset, attribute_targets, caption, make_scene


def test_caption_names_every_object_in_tiny_vocabulary():
    vocab = set(TINY_VOCAB.read_text().split())
    for index in range(50):
        scene = make_scene(0, index)
        parts = scene.caption.split(" and ")
        assert len(parts) == len(scene.objects)
        for o in scene.objects:
            assert f"a {o.color} {o.shape} in the {o.position}" in parts
        assert set(scene.caption.split()) <= vocab


def test_caption_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one object"):
        caption([], random.Random(0))


def test_targets_match_objects_and_pixels():
    scene = make_scene(3, 11, image_size=64, max_objects=4)
    t = attribute_targets(scene.objects)
    assert set(t) == set(ATTRIBUTE_GROUPS)
    assert int(t["count"]) == len(scene.objects) - 1
    assert int(t["shape"].sum()) == len({o.shape for o in scene.objects})
    pixels = np.asarray(scene.image)
    for o in scene.objects:
        assert t["color"][list(COLORS).index(o.color)] == 1
        assert t["cell_color"][o.cell] == 1 + list(COLORS).index(o.color)
        assert t["cell_shape"][o.cell] == 1 + list(SHAPES).index(o.shape)
        x0, y0, x1, y1 = o.box  # the box centre is inside every shape and has the object's colour
        assert tuple(pixels[(y0 + y1) // 2, (x0 + x1) // 2]) == COLORS[o.color]
    empty = [c for c in range(4) if c not in {o.cell for o in scene.objects}]
    assert all(t["cell_color"][c] == 0 for c in empty)


def test_scenes_are_reproducible_and_streams_differ():
    a, b = SceneDataset(8, seed=0), SceneDataset(100, seed=0)
    assert a[5]["caption"] == b[5]["caption"]  # item i does not depend on the data set's length
    assert np.array_equal(np.asarray(a[5]["image"]), np.asarray(b[5]["image"]))
    other = SceneDataset(8, seed=1)
    assert [a[i]["caption"] for i in range(8)] != [other[i]["caption"] for i in range(8)]
    with pytest.raises(IndexError):
        a[8]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"length": 0}, "length"),
        ({"length": 4, "max_objects": 5}, "max_objects"),
        ({"length": 4, "image_size": 16}, "image_size"),
    ],
)
def test_bad_scene_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SceneDataset(**kwargs)
