"""Scenes drawn outside the generator: the same vocabulary, drawn another way, to test generalisation.

data.py draws every training and held-out scene with one renderer (4x supersampled polygons,
exact colours, sizes 32-60 px times a per-shape scale). A model can score well there by learning
that renderer. The scenes here use the same words (data.SHAPES, data.COLOURS, data.BACKGROUNDS)
and the same captions, but none of data.py's drawing code:

    drawing      plain PIL.ImageDraw on a 1-bit canvas, no anti-aliasing: the mask of an object
                 is exactly the set of pixels PIL filled, and those pixels get the object's shade
                 (pixels of no object get the background's shade). Per shape:
                     circle    ImageDraw.ellipse of the object's bounding square
                     square    half of them axis-aligned, ImageDraw.rectangle (side d / sqrt 2);
                               the other half ImageDraw.regular_polygon(4 sides) turned by a
                               uniform angle in [0, 90) degrees
                     triangle  ImageDraw.regular_polygon(3 sides), angle uniform in [0, 120)
                     star      ImageDraw.polygon of a 5-point star (10 vertices), inner / outer
                               radius uniform in [0.38, 0.5] (data.py: always 0.45), turned by a
                               uniform angle in [0, 72)
                 Every shape is inscribed in a circle of diameter d (the object's `size`), as in
                 data.py, but d is the same for every shape (no per-shape scale).
    sizes        d uniform in 24-70 px alone, 24-56 px with a neighbour (data.py: 36-60 and 32-50
                 px for circles, up to 75 px for a lone star): smaller objects, and bigger
                 circles and squares, than the generator draws.
    positions    the centre uniform wherever the circle of diameter d fits with 1 px to spare;
                 two objects' circles are redrawn until they are OBJECT_GAP px apart, so the
                 objects never touch.
    shades       each object colour: every RGB channel of data.COLOURS moved by a uniform integer
                 in [-25, 25], clipped to 0..255 (a fresh shade per object); the background:
                 data.BACKGROUNDS moved by [-10, 10] per channel, clipped.
    contents     one or two objects with equal odds (or as asked), distinct (shape, colour), the
                 background and the objects' kinds uniform; the caption is data.describe's
                 canonical one ("a red circle and a blue square on a white background").

The results are data.py's own classes, so every scoring function runs on them unchanged:
`Scene` (image, caption, objects, background name), `ShapeObject` (shape, colour name, centre,
size d, rotation, mask, coverage = the mask as 0/1, bbox) and `EditPair`. Two fields mean less
here: `ShapeObject.rotation` is the angle given to PIL (its own convention), so
`ShapeObject.polygon()` is not the outline drawn; and `ShapeObject.rgb` / `Scene.background_rgb`
are the named colours, not the drawn shades. The masks are the truth.

Edit cases (`outside_edit_pairs`) follow data.edit_pairs: the kind cycles colour, shape, both;
the target differs from the source in what the kind says and from the other object in (shape,
colour); the target scene redraws the object at the same centre, size and angle (a new shade
when the colour changes, the same shade when only the shape does), everything else identical.

Seeds (numpy PCG64 from a tuple, one generator per item, as data.py; data.py's first words are
0, 1 and 2):
    outside_scenes(n, seed)      scene i from (10, seed, i)
    outside_edit_pairs(n, seed)  pair i from  (11, seed, i)
"""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import PIL.ImageDraw

from minidiff.errors import InputError
from minidiff.training.shapes.data import (
    BACKGROUNDS,
    COLOURS,
    DEFAULT_SIZE,
    EDIT_KINDS,
    SHAPES,
    EditPair,
    Scene,
    ShapeObject,
    describe,
)
from minidiff.validation import check_positive_int

_OUTSIDE_SCENES, _OUTSIDE_EDITS = 10, 11  # first seed words, apart from data.py's 0, 1, 2

SIZE_RANGE = {1: (24.0, 70.0), 2: (24.0, 56.0)}  # circumscribed diameter d at 128x128, by object count
OBJECT_GAP = 3.0  # px at 128x128 between the circumscribed circles of two objects
COLOUR_JITTER = 25  # per RGB channel, uniform integer in [-25, 25]
BACKGROUND_JITTER = 10
STAR_INNER_RANGE = (0.38, 0.5)  # inner / outer radius of a star


def _shade(rng: np.random.Generator, rgb: tuple[int, int, int], jitter: int) -> tuple[int, int, int]:
    """rgb with every channel moved by a uniform integer in [-jitter, jitter], clipped to 0..255."""
    moved = np.clip(np.asarray(rgb) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
    return tuple(int(v) for v in moved)


def _style(rng: np.random.Generator, shape: str) -> dict:
    """How PIL draws one shape: its angle (degrees, PIL's convention) and, for a star, its
    inner radius ratio. Squares are axis-aligned (angle 0, ImageDraw.rectangle) half the time."""
    if shape == "circle":
        return {"rotation": 0.0}
    if shape == "square":
        return {"rotation": 0.0 if rng.random() < 0.5 else float(rng.uniform(0.0, 90.0))}
    if shape == "triangle":
        return {"rotation": float(rng.uniform(0.0, 120.0))}
    return {"rotation": float(rng.uniform(0.0, 72.0)), "inner": float(rng.uniform(*STAR_INNER_RANGE))}


def _star(centre: tuple[float, float], radius: float, inner: float, rotation: float) -> list[tuple[float, float]]:
    """The 10 vertices of a 5-point star, the first outer one pointing up before the turn."""
    cx, cy = centre
    points = []
    for k in range(10):
        angle = math.radians(rotation) + math.pi / 2 + k * math.pi / 5
        r = radius if k % 2 == 0 else radius * inner
        points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))  # screen y grows downwards
    return points


def object_mask(spec: dict, size: int) -> np.ndarray:
    """The (size, size) bool mask of the pixels PIL fills for one object spec {shape, centre,
    size, rotation[, inner]}: drawn on a 1-bit canvas, no anti-aliasing."""
    canvas = PIL.Image.new("1", (size, size), 0)
    draw = PIL.ImageDraw.Draw(canvas)
    (cx, cy), r = spec["centre"], spec["size"] / 2
    shape = spec["shape"]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square" and spec["rotation"] == 0.0:
        half = r / math.sqrt(2)  # a square inscribed in the circle of radius r
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=1)
    elif shape in ("square", "triangle"):
        draw.regular_polygon((cx, cy, r), 4 if shape == "square" else 3, rotation=spec["rotation"], fill=1)
    elif shape == "star":
        draw.polygon(_star((cx, cy), r, spec["inner"], spec["rotation"]), fill=1)
    else:
        raise InputError(f"Unknown shape {shape!r}; the shapes world knows {list(SHAPES)}.")
    return np.array(canvas, dtype=bool)  # a writable copy (np.asarray of a PIL image is read-only)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def draw_scene(specs: list[dict], background: str, background_rgb: tuple[int, int, int],
               size: int = DEFAULT_SIZE) -> Scene:
    """A Scene from object specs {shape, colour, rgb, centre, size, rotation[, inner]} on a flat
    background of shade `background_rgb` (named `background` in the caption)."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background_rgb
    objects = []
    for spec in specs:
        mask = object_mask(spec, size)
        if not mask.any():
            raise InputError(f"Object {spec} covers no pixel of a {size}x{size} image.")
        image[mask] = spec["rgb"]
        objects.append(ShapeObject(spec["shape"], spec["colour"], tuple(spec["centre"]), float(spec["size"]),
                                   float(spec["rotation"]), mask, mask.astype(np.float32), _bbox(mask)))
    caption = describe([(o.colour, o.shape) for o in objects], background)
    return Scene(image, caption, objects, background)


def sample_specs(rng: np.random.Generator, num_objects: int, size: int = DEFAULT_SIZE) -> list[dict]:
    """Random object specs for one scene (see the header): kinds, shades, sizes, positions, styles."""
    scale = size / DEFAULT_SIZE
    kinds: list[tuple[str, str]] = []
    while len(kinds) < num_objects:
        kind = (SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))])
        if kind not in kinds:
            kinds.append(kind)
    lo, hi = SIZE_RANGE[num_objects]
    for _attempt in range(10_000):
        d = rng.uniform(lo, hi, num_objects) * scale
        r = d / 2
        centres = rng.uniform(r[:, None] + scale, size - r[:, None] - scale, (num_objects, 2))
        if num_objects == 1 or math.dist(centres[0], centres[1]) >= r[0] + r[1] + OBJECT_GAP * scale:
            break
    else:  # two 56 px circles fit in most draws; the odds of 10 000 failures are negligible
        raise RuntimeError("Could not place the objects without overlap.")
    return [{"shape": shape, "colour": colour, "rgb": _shade(rng, COLOURS[colour], COLOUR_JITTER),
             "centre": (float(c[0]), float(c[1])), "size": float(dk), **_style(rng, shape)}
            for (shape, colour), c, dk in zip(kinds, centres, d)]


def _random_scene(rng: np.random.Generator, num_objects: int | None, size: int) -> tuple[list[dict], str, tuple]:
    if num_objects not in (None, 1, 2):
        raise InputError(f"num_objects must be 1, 2 or None (random); got {num_objects}.")
    if size < 32:
        raise InputError(f"Scenes need size >= 32 pixels for recognisable objects; got {size}.")
    n = int(rng.integers(1, 3)) if num_objects is None else num_objects
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    background_rgb = _shade(rng, BACKGROUNDS[background], BACKGROUND_JITTER)
    return sample_specs(rng, n, size), background, background_rgb


def outside_scenes(n: int = 100, seed: int = 0, num_objects: int | None = None,
                   size: int = DEFAULT_SIZE) -> list[Scene]:
    """n scenes drawn with plain PIL (see the header), scene i from seed (10, seed, i)."""
    check_positive_int("n", n)
    scenes = []
    for i in range(n):
        specs, background, background_rgb = _random_scene(np.random.default_rng((_OUTSIDE_SCENES, seed, i)),
                                                          num_objects, size)
        scenes.append(draw_scene(specs, background, background_rgb, size))
    return scenes


def outside_edit_pairs(n: int = 100, seed: int = 0, num_objects: int | None = None,
                       size: int = DEFAULT_SIZE) -> list[EditPair]:
    """n DiffEdit cases on scenes drawn with plain PIL, pair i from seed (11, seed, i); the rules
    of data.edit_pairs (see the header), so evaluate_diffedit(..., pairs=...) scores them."""
    check_positive_int("n", n)
    pairs = []
    for i in range(n):
        rng = np.random.default_rng((_OUTSIDE_EDITS, seed, i))
        specs, background, background_rgb = _random_scene(rng, num_objects, size)
        scene = draw_scene(specs, background, background_rgb, size)
        index = int(rng.integers(len(specs)))
        obj = specs[index]
        others = {(o["shape"], o["colour"]) for j, o in enumerate(specs) if j != index}
        kind = EDIT_KINDS[i % 3]
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))] if kind != "colour" else obj["shape"]
            colour = list(COLOURS)[rng.integers(len(COLOURS))] if kind != "shape" else obj["colour"]
            if ((kind == "colour" or shape != obj["shape"]) and (kind == "shape" or colour != obj["colour"])
                    and (shape, colour) not in others):
                break
        new = {"shape": shape, "colour": colour, "centre": obj["centre"], "size": obj["size"]}
        new["rgb"] = obj["rgb"] if colour == obj["colour"] else _shade(rng, COLOURS[colour], COLOUR_JITTER)
        if shape == obj["shape"]:
            new.update({k: obj[k] for k in ("rotation", "inner") if k in obj})
        else:  # the same angle where it means something, a star's own inner ratio
            style = _style(rng, shape)
            new.update(style, rotation=obj["rotation"] if shape != "circle" else 0.0)
        target_specs = [dict(o) for o in specs]
        target_specs[index] = new
        target = draw_scene(target_specs, background, background_rgb, size)
        pairs.append(EditPair(scene, index, shape, colour, scene.caption, target.caption, kind, target))
    return pairs
