"""Synthetic grounding VQA: filled shapes on a jittered grid, one-word answers.

Every example is a pure function of an integer seed (Python's `random.Random(seed)`,
which is stable across CPython versions for `random()`/`randrange()`/`shuffle()`), so the
same seed gives identical image bytes and identical question/answer on any machine.

Scene: a light background, a 4-column x 3-row grid of cells (rows are top/middle/bottom),
6-12 of the 12 cells hold one filled shape (circle, square, triangle, star) in one of six
colours (red, green, blue, yellow, purple, orange), jittered inside its cell.

Question templates (the answer is one word, two for ``where``):

* ``color_of_shape``  -- ``What color is the {shape}?``      (that shape occurs once)
* ``relation``        -- ``What shape is {left of|right of|above|below} the {color} {shape}?``
  (the referent is the only object of that colour and shape; the answer is the nearest
  object in the same row (left/right) or column (above/below) on that side)
* ``count``           -- ``How many {color} objects are there?``  (zero..twelve)
* ``exists``          -- ``Is there a {color} {shape}?``       (yes/no, balanced)
* ``row``             -- ``Which row is the {color} {shape} in?`` (top/middle/bottom;
  the referent is unique)
* ``where``           -- ``Where is the {color} {shape}?`` (its grid cell: row word then column
  word, e.g. ``top midleft``; the referent is unique). Not in ``QTYPES`` (the five types the
  4-layer checkpoint was trained on, which ``make_example(seed)``, ``make_multi_qa`` and
  ``make_heldout_examples`` draw from by default, so their examples stay as they were); it is
  in ``ALL_QTYPES``, which the last two take as their ``qtypes`` argument
  (``make_example(seed, "where")`` asks for it directly).

Training uses seeds in ``[0, HELDOUT_SEED_BASE)``; held-out sets use seeds from
``HELDOUT_SEED_BASE`` up, so the two never overlap.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 75, 215),
    "yellow": (230, 195, 20),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
QTYPES: tuple[str, ...] = ("color_of_shape", "relation", "count", "exists", "row")
# grounding type added for the 16-layer demo model (issue 14); every type, in report order
EXTRA_QTYPES: tuple[str, ...] = ("where",)
ALL_QTYPES: tuple[str, ...] = QTYPES + EXTRA_QTYPES
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
# one word each (single tokens of the demo tokenizer's word-level vocabulary)
COL_NAMES: tuple[str, ...] = ("left", "midleft", "midright", "right")
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

IMAGE_SIZE = 256  # pixels, square; equals the vision tower's tile so nothing is resized
GRID_COLS = 4
GRID_ROWS = 3
MIN_OBJECTS = 6
MAX_OBJECTS = 12
MIN_OBJ_SIZE = 34  # bounding-box side in pixels
MAX_OBJ_SIZE = 46
COLOR_JITTER = 12  # +- per channel

HELDOUT_SEED_BASE = 10_000_000  # training seeds are < this, held-out seeds >= this


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int  # 0 = top
    col: int  # 0 = left
    cx: float  # centre, pixels
    cy: float
    size: float  # bounding-box side, pixels
    rgb: tuple[int, int, int]


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[int, int, int]
    image_size: int = IMAGE_SIZE

    def at(self, row: int, col: int) -> Obj | None:
        for o in self.objects:
            if o.row == row and o.col == col:
                return o
        return None

    def find(self, color: str | None = None, shape: str | None = None) -> list[Obj]:
        return [
            o
            for o in self.objects
            if (color is None or o.color == color) and (shape is None or o.shape == shape)
        ]

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.image_size, self.image_size), self.background)
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            _draw_shape(draw, o)
        return img

    def describe(self) -> str:
        return "; ".join(
            f"{o.color} {o.shape} r{o.row}c{o.col}"
            for o in sorted(self.objects, key=lambda o: (o.row, o.col))
        )


@dataclass
class Example:
    seed: int
    image: Image.Image
    question: str
    answer: str
    qtype: str
    scene: Scene = field(repr=False)


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    r = o.size / 2.0
    cx, cy = o.cx, o.cy
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=o.rgb)
    elif o.shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=o.rgb)
    elif o.shape == "triangle":
        pts = [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
        draw.polygon(pts, fill=o.rgb)
    elif o.shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        draw.polygon(pts, fill=o.rgb)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(o.shape)


def _jitter_rgb(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(  # type: ignore[return-value]
        max(0, min(255, c + rng.randrange(-COLOR_JITTER, COLOR_JITTER + 1))) for c in rgb
    )


def make_scene(rng: random.Random, image_size: int = IMAGE_SIZE) -> Scene:
    n = rng.randrange(MIN_OBJECTS, MAX_OBJECTS + 1)
    cells = [(r, c) for r in range(GRID_ROWS) for c in range(GRID_COLS)]
    rng.shuffle(cells)
    cells = sorted(cells[:n])
    cw = image_size / GRID_COLS
    ch = image_size / GRID_ROWS
    objects = []
    for r, c in cells:
        shape = SHAPES[rng.randrange(len(SHAPES))]
        color = COLOR_NAMES[rng.randrange(len(COLOR_NAMES))]
        size = MIN_OBJ_SIZE + rng.random() * (MAX_OBJ_SIZE - MIN_OBJ_SIZE)
        # keep the whole object inside its cell with a 3 px margin
        jx = max(0.0, (cw - size) / 2 - 3)
        jy = max(0.0, (ch - size) / 2 - 3)
        cx = (c + 0.5) * cw + (rng.random() * 2 - 1) * jx
        cy = (r + 0.5) * ch + (rng.random() * 2 - 1) * jy
        objects.append(Obj(shape, color, r, c, cx, cy, size, _jitter_rgb(rng, COLORS[color])))
    bg = tuple(236 + rng.randrange(0, 20) for _ in range(3))
    return Scene(objects=objects, background=bg, image_size=image_size)  # type: ignore[arg-type]


def _unique_refs(scene: Scene) -> list[Obj]:
    """Objects whose (colour, shape) pair is unique in the scene."""
    return [o for o in scene.objects if len(scene.find(o.color, o.shape)) == 1]


def neighbour(scene: Scene, o: Obj, relation: str) -> Obj | None:
    """Nearest object on that side of `o` in the same row (left/right) or column (above/below)."""
    if relation == "left of":
        cand = [p for p in scene.objects if p.row == o.row and p.col < o.col]
        return max(cand, key=lambda p: p.col) if cand else None
    if relation == "right of":
        cand = [p for p in scene.objects if p.row == o.row and p.col > o.col]
        return min(cand, key=lambda p: p.col) if cand else None
    if relation == "above":
        cand = [p for p in scene.objects if p.col == o.col and p.row < o.row]
        return max(cand, key=lambda p: p.row) if cand else None
    if relation == "below":
        cand = [p for p in scene.objects if p.col == o.col and p.row > o.row]
        return min(cand, key=lambda p: p.row) if cand else None
    raise ValueError(relation)


def cell_name(row: int, col: int) -> str:
    """The ``where`` answer for a grid cell: row word then column word, e.g. ``top midleft``."""
    return f"{ROW_NAMES[row]} {COL_NAMES[col]}"


def make_question(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """One (question, answer) of type `qtype` about `scene`, or None if the scene can't host it."""
    if qtype == "color_of_shape":
        shapes = [s for s in SHAPES if len(scene.find(shape=s)) == 1]
        if not shapes:
            return None
        s = shapes[rng.randrange(len(shapes))]
        return f"What color is the {s}?", scene.find(shape=s)[0].color
    if qtype == "relation":
        pairs = [
            (o, rel)
            for o in _unique_refs(scene)
            for rel in RELATIONS
            if neighbour(scene, o, rel) is not None
        ]
        if not pairs:
            return None
        o, rel = pairs[rng.randrange(len(pairs))]
        ans = neighbour(scene, o, rel)
        assert ans is not None
        return f"What shape is {rel} the {o.color} {o.shape}?", ans.shape
    if qtype == "count":
        c = COLOR_NAMES[rng.randrange(len(COLOR_NAMES))]
        return f"How many {c} objects are there?", NUMBER_WORDS[len(scene.find(color=c))]
    if qtype == "exists":
        present = sorted({(o.color, o.shape) for o in scene.objects})
        absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
        want_yes = rng.random() < 0.5
        pool = present if want_yes else absent
        if not pool:
            return None
        c, s = pool[rng.randrange(len(pool))]
        return f"Is there a {c} {s}?", "yes" if want_yes else "no"
    if qtype == "row":
        refs = _unique_refs(scene)
        if not refs:
            return None
        o = refs[rng.randrange(len(refs))]
        return f"Which row is the {o.color} {o.shape} in?", ROW_NAMES[o.row]
    if qtype == "where":
        refs = _unique_refs(scene)
        if not refs:
            return None
        o = refs[rng.randrange(len(refs))]
        return f"Where is the {o.color} {o.shape}?", cell_name(o.row, o.col)
    raise ValueError(f"unknown question type {qtype!r}")


def make_example(seed: int, qtype: str | None = None) -> Example:
    """The example for `seed`; the question type is drawn from the seed unless given.

    Scenes that can't host the question type are redrawn from the same RNG stream, so the
    result stays a pure function of (seed, qtype).
    """
    rng = random.Random(seed)
    if qtype is None:
        qtype = QTYPES[rng.randrange(len(QTYPES))]
    for _ in range(1000):
        scene = make_scene(rng)
        qa = make_question(scene, qtype, rng)
        if qa is not None:
            return Example(seed, scene.render(), qa[0], qa[1], qtype, scene)
    raise RuntimeError(f"no scene for {qtype} from seed {seed}")  # pragma: no cover


def make_multi_qa(
    seed: int, extra: int = 2, qtypes: tuple[str, ...] = QTYPES
) -> tuple[Scene, list[tuple[str, str, str]]]:
    """A scene and several (question, answer, qtype) about it: every type of `qtypes` it can
    host, in a random order, then `extra` more of random types (used as a training sample)."""
    rng = random.Random(seed)
    scene = make_scene(rng)
    order = list(qtypes)
    rng.shuffle(order)
    order += [qtypes[rng.randrange(len(qtypes))] for _ in range(extra)]
    qas: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for t in order:
        qa = make_question(scene, t, rng)
        if qa is not None and qa[0] not in seen:
            seen.add(qa[0])
            qas.append((qa[0], qa[1], t))
    return scene, qas


def parse_qtypes(spec: str) -> tuple[str, ...]:
    """A ``--qtypes`` option: ``""`` -> ``QTYPES`` (the five original types), ``"all"`` ->
    ``ALL_QTYPES``, else a comma-separated list of names (returned in ``ALL_QTYPES`` order)."""
    if not spec.strip():
        return QTYPES
    if spec.strip() == "all":
        return ALL_QTYPES
    names = {x.strip() for x in spec.split(",") if x.strip()}
    unknown = names - set(ALL_QTYPES)
    if unknown:
        raise ValueError(f"unknown question type(s) {sorted(unknown)}")
    return tuple(t for t in ALL_QTYPES if t in names)


def heldout_seeds(n: int, seed: int = HELDOUT_SEED_BASE) -> list[int]:
    if seed < HELDOUT_SEED_BASE:
        raise ValueError(f"held-out seeds start at {HELDOUT_SEED_BASE}, got {seed}")
    return list(range(seed, seed + n))


def make_heldout_examples(
    n: int, seed: int = HELDOUT_SEED_BASE, qtypes: tuple[str, ...] = QTYPES
) -> list[Example]:
    """`n` held-out examples, question types balanced (round-robin over `qtypes`; the default,
    the five original types, keeps the held-out sets the 4-layer checkpoint was measured on)."""
    return [make_example(s, qtypes[i % len(qtypes)]) for i, s in enumerate(heldout_seeds(n, seed))]


def extra_vocabulary_corpus() -> list[str]:
    """Text with the words of ``EXTRA_QTYPES`` (kept apart from ``vocabulary_corpus`` so that
    the tokenizer can append these words after the original ones and keep their ids)."""
    lines = [f"Where is the {c} {s}?" for c in COLOR_NAMES for s in SHAPES]
    cells = [cell_name(r, c) for r in range(GRID_ROWS) for c in range(GRID_COLS)]
    lines.append(" ".join(cells))
    lines += [f"Assistant: {a}" for a in cells]
    return lines


def vocabulary_corpus() -> list[str]:
    """Text that covers every word of the five original question types (for training the
    tokenizer; ``extra_vocabulary_corpus`` has the words of the newer types)."""
    lines = []
    for s in SHAPES:
        lines.append(f"What color is the {s}?")
    for c in COLOR_NAMES:
        lines.append(f"How many {c} objects are there?")
        for s in SHAPES:
            lines.append(f"Is there a {c} {s}?")
            lines.append(f"Which row is the {c} {s} in?")
            for rel in RELATIONS:
                lines.append(f"What shape is {rel} the {c} {s}?")
    answers = list(COLOR_NAMES) + list(SHAPES) + list(NUMBER_WORDS) + ["yes", "no"]
    answers += list(ROW_NAMES)
    lines.append(" ".join(answers))
    lines += [f"Assistant: {a}" for a in answers]
    return lines
