"""The scene of a generated shapes image read back from its pixels, and every question's answer about it.

The shapes task stores questions and answers, not scenes; its images have no anti-aliasing (every shape
pixel is an exact palette colour) and at most one shape per grid cell, so each cell's colour and shape can
be read exactly: the colour is the palette colour in the cell, the shape follows from how much of its
bounding box the colour fills (square 1, circle pi/4, triangle 1/2). Causal tracing uses it to swap the
question word the answer depends on for one that changes the answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from fusion.tasks.shapes import COLORS, GRID, SceneObject, candidate_questions, cell_bounds


def shape_from_fill(fill: float) -> str:
    """The shape whose share of its bounding box is nearest ``fill`` (square 1, circle ~0.785, triangle ~0.5)."""
    return "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"


def read_scene(image: Image.Image) -> list[SceneObject]:
    """The objects of a rendered shapes image (colour, shape, cell, pixel box), from its pixels."""
    image = image.convert("RGB")
    palette = {rgb: name for name, rgb in COLORS.items()}
    pixels = image.load()
    objects = []
    for cell in range(GRID * GRID):
        x_start, y_start, x_end, y_end = cell_bounds(cell, image.width)
        found: dict[str, list[tuple[int, int]]] = {}
        for y in range(y_start, y_end):
            for x in range(x_start, x_end):
                name = palette.get(pixels[x, y])
                if name is not None:
                    found.setdefault(name, []).append((x, y))
        if not found:
            continue
        color, points = max(found.items(), key=lambda item: len(item[1]))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        box = (min(xs), min(ys), max(xs), max(ys))
        fill = len(points) / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        objects.append(SceneObject(color=color, shape=shape_from_fill(fill), cell=cell, box=box))
    return objects


def scene_answers(image_path: str | Path) -> dict[str, str]:
    """Every question the generator can ask about the image at ``image_path`` -> its answer."""
    with Image.open(image_path) as image:
        objects = read_scene(image)
    return {question: answer for qs in candidate_questions(objects).values() for question, answer in qs}


def word_swaps(question: str, swaps: Sequence[Sequence[str]]) -> Iterator[str]:
    """``question`` with one word replaced by another of its group, for every swappable word (left to right) and
    every other word of its group (the next one first). A plural keeps its ``s`` ("circles" -> "squares")."""
    words = question.split(" ")
    vocabulary = {w for group in swaps for w in group}
    for i, word in enumerate(words):
        bare = word.rstrip("?.,!")
        core = bare if bare in vocabulary else bare[:-1] if bare.endswith("s") else bare
        for group in swaps:
            if core in group:
                start = list(group).index(core)
                for k in range(1, len(group)):
                    replacement = group[(start + k) % len(group)]
                    yield " ".join([*words[:i], word.replace(core, replacement, 1), *words[i + 1 :]])


def answer_changing_swap(question: str, answer: str, answers: dict[str, str],
                         swaps: Sequence[Sequence[str]]) -> str | None:
    """The first one-word swap of ``question`` that is a question about the same scene (``answers``: question ->
    answer) with another answer than ``answer``; None if no swap changes the answer."""
    return next((q for q in word_swaps(question, swaps) if answers.get(q, answer) != answer), None)
