"""The embedded default task: VQA about procedurally drawn coloured shapes (no download needed).

Each image is a 2x2 grid of cells on a black background; up to ``max_objects`` cells hold one big,
flat-coloured shape. Questions ask about colour, shape, count and position (the quadrant), and are
only asked when the answer is unambiguous in that image.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from fusion.counter import progress_counter
from fusion.io import atomic_write, write_text
from fusion.tasks.base import Example, FileTask
from fusion.tasks.formats import read_json

# Bump when the rendering or question logic changes, so old folders are never reused.
FORMAT_VERSION = 1

# Saturated and far apart in hue, so they survive downscaling to ~32 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 70, 255),
    "yellow": (255, 220, 0),
    "purple": (170, 0, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
GRID = 2
# One answer per grid cell, so a position answer never depends on how far from the centre a shape sits.
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
ANSWER_TYPES: tuple[str, ...] = ("color", "shape", "count", "position")
BACKGROUND = (0, 0, 0)
MIN_IMAGE_SIZE = 32
QUESTIONS_PER_IMAGE = 3


def count_answers(max_objects: int) -> list[str]:
    """Count answers as digits, ``"1"`` to ``str(max_objects)``."""
    return [str(n) for n in range(1, max_objects + 1)]


def answer_vocabulary(max_objects: int) -> list[str]:
    """The fixed, ordered answer list: colours, shapes, counts, positions."""
    return [*COLORS, *SHAPES, *count_answers(max_objects), *POSITIONS]


@dataclass(frozen=True)
class SceneObject:
    """One shape: its colour and shape names, its grid cell and its pixel box ``(x0, y0, x1, y1)``.

    The box is inclusive (PIL convention) and lies strictly inside the cell, so objects never touch.
    """

    color: str
    shape: str
    cell: int
    box: tuple[int, int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


def cell_bounds(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x_start, y_start, x_end, y_end)`` (end exclusive) of a grid cell."""
    row, col = divmod(cell, GRID)
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def sample_scene(rng: random.Random, image_size: int, max_objects: int) -> list[SceneObject]:
    """Draw 1..max_objects objects in distinct cells with random colour, shape, size and jitter."""
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    # A per-scene sub-palette makes repeated colours and shapes common; with free choice "how many red
    # shapes" would nearly always be 1 and the question text alone would give the answer away.
    colors = rng.sample(list(COLORS), rng.randint(1, n))
    shapes = rng.sample(SHAPES, rng.randint(1, min(n, len(SHAPES))))
    objects = []
    for cell in cells:
        x_start, y_start, x_end, y_end = cell_bounds(cell, image_size)
        size = min(x_end - x_start, y_end - y_start)
        # A padding of ~8% keeps a visible gap between neighbours even after downscaling.
        pad = max(1, round(0.08 * size))
        room = size - 2 * pad
        side = rng.randint(round(0.7 * room), room)
        x0 = x_start + pad + rng.randint(0, room - side)
        y0 = y_start + pad + rng.randint(0, room - side)
        objects.append(
            SceneObject(
                color=rng.choice(colors),
                shape=rng.choice(shapes),
                cell=cell,
                box=(x0, y0, x0 + side - 1, y0 + side - 1),
            )
        )
    return objects


def render_scene(objects: Sequence[SceneObject], image_size: int) -> Image.Image:
    """Draw ``objects`` on a black RGB canvas; no anti-aliasing, so every pixel is an exact palette colour."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLORS[obj.color]
        x0, y0, x1, y1 = obj.box
        if obj.shape == "circle":
            draw.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; allowed: {list(SHAPES)}")
    return image


def candidate_questions(objects: Sequence[SceneObject]) -> dict[str, list[tuple[str, str]]]:
    """Every unambiguous ``(question, answer)`` about the scene, grouped by answer type."""
    by_color = Counter(o.color for o in objects)
    by_shape = Counter(o.shape for o in objects)
    by_both = Counter((o.color, o.shape) for o in objects)
    out: dict[str, list[tuple[str, str]]] = {t: [] for t in ANSWER_TYPES}
    for o in objects:
        out["color"].append((f"what color is the shape in the {o.position}?", o.color))
        out["shape"].append((f"what shape is in the {o.position}?", o.shape))
        if by_shape[o.shape] == 1:
            out["color"].append((f"what color is the {o.shape}?", o.color))
            out["position"].append((f"where is the {o.shape}?", o.position))
        if by_color[o.color] == 1:
            out["shape"].append((f"what shape is the {o.color} object?", o.shape))
            out["position"].append((f"where is the {o.color} object?", o.position))
        if by_both[(o.color, o.shape)] == 1:
            out["position"].append((f"where is the {o.color} {o.shape}?", o.position))
    out["count"].append(("how many shapes are there?", str(len(objects))))
    out["count"] += [(f"how many {c} shapes are there?", str(n)) for c, n in sorted(by_color.items())]
    out["count"] += [(f"how many {s}s are there?", str(n)) for s, n in sorted(by_shape.items())]
    # Several objects can yield the same question (e.g. two unique shapes, same cell query); dedupe.
    return {t: list(dict.fromkeys(qs)) for t, qs in out.items()}


def choose_questions(
    candidates: dict[str, list[tuple[str, str]]],
    rng: random.Random,
    type_counts: Counter[str],
    answer_counts: Counter[str],
    k: int = QUESTIONS_PER_IMAGE,
) -> list[tuple[str, str, str]]:
    """Pick ``k`` questions of distinct types, greedily favouring the rarest types and answers so far.

    Greedy balancing keeps every type near 1/4 of the data and flattens the answers within a type
    (plain random choice would make "1" dominate the counts, for instance). Updates the counters.
    """
    types = [t for t in ANSWER_TYPES if candidates[t]]
    rng.shuffle(types)  # random tie-break, then a stable sort by how often each type was used
    types.sort(key=lambda t: type_counts[t])
    chosen = []
    for t in types[:k]:
        options = list(candidates[t])
        rng.shuffle(options)
        question, answer = min(options, key=lambda qa: answer_counts[qa[1]])
        type_counts[t] += 1
        answer_counts[answer] += 1
        chosen.append((question, answer, t))
    return chosen


class ShapesTask(FileTask):
    """Procedurally generated shapes VQA, seeded and generated on first use under ``root/shapes``.

    Open-ended: a generated answer is right when it is exactly the answer (lower-case words and digits, as in
    :func:`answer_vocabulary`; :meth:`~fusion.tasks.base.VLTask.update_metric_text`).
    """

    name = "shapes"
    open_ended = True
    splits = ("train", "val", "test")

    def __init__(
        self,
        root: str | Path,
        num_train: int = 3000,
        num_val: int = 500,
        num_test: int = 500,
        image_size: int = 64,
        max_objects: int = 3,
        seed: int = 0,
    ) -> None:
        for param, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{param} must be an integer >= 0, got {value!r}")
        if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
        if not isinstance(max_objects, int) or not 1 <= max_objects <= GRID * GRID:
            raise ValueError(
                f"max_objects must be an integer in [1, {GRID * GRID}] (one object per grid cell), got {max_objects!r}"
            )
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        super().__init__(root)
        self.num_images = {"train": num_train, "val": num_val, "test": num_test}
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed
        self._answers = answer_vocabulary(max_objects)
        self._label = {a: i for i, a in enumerate(self._answers)}

    @property
    def answers(self) -> list[str]:
        return list(self._answers)

    @property
    def answer_types(self) -> list[str]:
        return list(ANSWER_TYPES)

    def params(self) -> dict[str, int]:
        """The generation parameters; the data folder name is a hash of these."""
        return {
            "format_version": FORMAT_VERSION,
            **{f"num_{split}": n for split, n in self.num_images.items()},
            "image_size": self.image_size,
            "max_objects": self.max_objects,
            "seed": self.seed,
        }

    @property
    def digest(self) -> str:
        """Short hash of :meth:`params`; names the data folder and prefixes image keys."""
        blob = json.dumps(self.params(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def data_dir(self) -> Path:
        """``root/shapes/<digest>``: where this parameter set's data lives once prepared."""
        return self.root / "shapes" / self.digest

    def is_complete(self, folder: Path | None = None) -> bool:
        """Whether ``folder`` (default: the data folder) holds finished data for these parameters."""
        meta_path = (folder or self.data_dir) / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return False
        return meta.get("complete") is True and meta.get("params") == self.params()

    def prepare_data(self) -> None:
        """Generate images and questions unless a complete folder for these parameters exists."""
        final = self.data_dir
        if self.is_complete(final):
            return
        if final.exists():
            # Renames are atomic, so a folder we made is complete as soon as it exists (another process
            # may have just finished); one that is not was made by hand.
            if self.is_complete(final):
                return
            raise RuntimeError(f"{final} exists but is not a complete shapes dataset; delete it and retry")
        final.parent.mkdir(parents=True, exist_ok=True)
        # Unique hidden sibling: concurrent generators never share one, and a killed run leaves only junk
        # that neither is_complete() nor the final path ever sees.
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self._generate(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Lost a race: someone renamed a complete folder into place first; use theirs.
                if not self.is_complete(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _generate(self, folder: Path) -> None:
        stats = {}
        for split in self.splits:
            # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs and
            # machines, and each split's data does not depend on the other splits' sizes.
            rng = random.Random(f"shapes:{self.seed}:{split}")
            image_dir = folder / "images" / split
            image_dir.mkdir(parents=True)
            type_counts: Counter[str] = Counter()
            answer_counts: Counter[str] = Counter()
            questions = []
            for i in progress_counter(range(self.num_images[split]), desc=f"shapes {split}", unit="img"):
                image_id = f"{i:06d}"
                objects = sample_scene(rng, self.image_size, self.max_objects)
                image = render_scene(objects, self.image_size)
                atomic_write(image_dir / f"{image_id}.png", lambda f, image=image: image.save(f, format="PNG"))
                chosen = choose_questions(candidate_questions(objects), rng, type_counts, answer_counts)
                for j, (question, answer, answer_type) in enumerate(chosen):
                    questions.append(
                        {
                            "question_id": f"{split}_{image_id}_{j}",
                            "image_id": image_id,
                            "question": question,
                            "answer": answer,
                            "answer_type": answer_type,
                        }
                    )
            write_text(folder / f"{split}_questions.json", json.dumps(questions, indent=1))
            stats[split] = {
                "images": self.num_images[split],
                "questions": len(questions),
                "answer_types": dict(sorted(type_counts.items())),
                "answers": dict(sorted(answer_counts.items())),
            }
        meta = {
            "params": self.params(),
            "colors": {name: list(rgb) for name, rgb in COLORS.items()},
            "shapes": list(SHAPES),
            "positions": list(POSITIONS),
            "answers": self._answers,
            "answer_types": list(ANSWER_TYPES),
            "splits": stats,
            # Written last and checked by is_complete(): its presence marks the folder as finished.
            "complete": True,
        }
        write_text(folder / "meta.json", json.dumps(meta, indent=1))

    def questions_path(self, split: str) -> Path:
        """The generated questions of ``split``."""
        return self.data_dir / f"{split}_questions.json"

    def read_split(self, split: str) -> list[Example]:
        """All examples of ``split`` in file order; the data is generated first if it is not there yet.

        Generation is deterministic, so any entry point that reads examples (``eval.py`` and the analyses on
        a machine where training never ran) gets the data training used without a ``prepare_data`` call.
        """
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; allowed: {list(self.splits)}")
        if not self.is_complete():
            self.prepare_data()
        path = self.questions_path(split)
        rows = read_json(path, f"shapes questions of split {split!r}")
        examples = [
            Example(
                question_id=str(row["question_id"]),
                # The digest keeps keys of differently generated data apart in a shared feature cache.
                image_key=f"shapes/{self.digest}/{split}/{row['image_id']}",
                image_path=self.data_dir / "images" / split / f"{row['image_id']}.png",
                question=row["question"],
                label=self._label[row["answer"]],
                answer_type=row["answer_type"],
            )
            for row in rows
        ]
        return examples

    def reference(self, split: str, example: Example) -> str:
        return f"{self.questions_path(split)}: question_id {example.question_id!r}"

    def source(self, split: str) -> str:
        return str(self.questions_path(split))

    def meta(self) -> dict:
        """The parsed ``meta.json`` of the data folder (parameters, vocabularies, counts)."""
        return json.loads((self.data_dir / "meta.json").read_text())
