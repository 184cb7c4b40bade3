"""Reading a generated shapes scene back from its pixels, and the swap that changes a question's answer."""

import random

from fusion.analysis.pairs import DEFAULT_SWAPS
from fusion.analysis.shapes_scene import answer_changing_swap, read_scene, word_swaps
from fusion.tasks.shapes import SceneObject, candidate_questions, render_scene, sample_scene


def test_read_scene_recovers_every_generated_scene_from_its_pixels():
    rng = random.Random(0)
    for size in (64, 32, 96):
        for _ in range(150):
            objects = sample_scene(rng, size, 4)
            read = read_scene(render_scene(objects, size))
            assert [(o.color, o.shape, o.cell, o.box) for o in read] == [
                (o.color, o.shape, o.cell, o.box) for o in objects
            ]


def test_answer_changing_swap_names_another_object_of_the_scene():
    objects = [SceneObject("red", "circle", 0, (2, 2, 20, 20)), SceneObject("blue", "square", 3, (40, 40, 60, 60))]
    answers = {q: a for qs in candidate_questions(objects).values() for q, a in qs}
    assert answer_changing_swap("what color is the circle?", "red", answers, DEFAULT_SWAPS) == (
        "what color is the square?"
    )
    # "top left" -> "bottom left" is no question about this scene (empty cell); "top right" neither;
    # "bottom right" takes two swaps, so a one-word swap gives no answer-changing pair.
    assert answer_changing_swap("what shape is in the top left?", "circle", answers, DEFAULT_SWAPS) is None
    # Colours are tried in group order from the next one: green (absent), blue (present, another answer).
    assert answer_changing_swap("where is the red object?", "top left", answers, DEFAULT_SWAPS) == (
        "where is the blue object?"
    )
    assert answer_changing_swap("how many shapes are there?", "2", answers, DEFAULT_SWAPS) is None
    assert list(word_swaps("how many circles are there?", [["circle", "square", "triangle"]])) == [
        "how many squares are there?", "how many triangles are there?"]
