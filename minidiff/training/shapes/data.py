"""The shapes world: a seeded generator of captioned images with exact object masks.

Every minidiff pipeline needs an image world small enough to train on a CPU and simple enough
to score automatically. This file draws it:

    "a red circle and a blue square on a white background"  ->  128x128 RGB image
                                                                + one exact boolean mask per object

Vocabulary (picked to stay apart after an f=8 VAE, which sees a 128x128 image as 16x16 latents):
    SHAPES       circle, square, triangle, star
    COLOURS      red, green, blue, yellow, purple, orange (saturated; pairwise RGB distance
                 >= 91, the closest pair being yellow-orange; the others >= 119)
    BACKGROUNDS  white, gray, beige (flat and light; RGB distance >= 149 from every object colour)

Scenes hold one or two objects. Each object has a random size (`size` = diameter of the
circumscribed circle: 36-60 px alone, 32-50 px with a neighbour, at 128x128, times SHAPE_SCALE:
1.1 for squares, 1.25 for triangles and stars, which fill less of their circle; scaled with the
image side), position and rotation (uniform, 0-360 degrees). The circumscribed circles of two objects stay
`OBJECT_MARGIN` px apart and inside the image, so objects never overlap or touch and every mask
is exact. The two objects of a scene differ in (shape, colour) so that a caption names each one
unambiguously.

Rendering and the exact mask:
    Each object is drawn as a filled polygon (a 128-gon for the circle) on a 4x supersampled
    canvas. Coverage c in {0, 1/16, ..., 1} of an output pixel is the fraction of its 4x4
    sub-pixels inside the polygon; the image is background * (1 - c) + colour * c (a box-filter
    anti-alias), and the exact mask is c >= 1/2. So pixels inside the mask are closer to the
    object colour than to the background, pixels with c = 1 have the object colour exactly, and
    pixels more than a pixel away from every mask have the background colour exactly.
    `Scene.hard_image()` is the un-antialiased render (mask pixels coloured, others background).

Captions (object order in the caption = order of `Scene.objects`; "an" before "orange"):
    one object    "a red circle on a white background" | "a red circle" |
                  "a picture of a red circle on a white background"
    two objects   "a red circle and a blue square on a white background" |
                  "a red circle next to a blue square on a white background" |
                  "a red circle and a blue square"
    `describe(...)` always gives the first template, the canonical prompt used for evaluation.

Seeds and splits (numpy PCG64 seeded from a tuple of words, one generator per scene):
    scene_stream(seed)         scene i from  (0, seed, i): the infinite training stream
    held_out_scenes(split, n)  scene i from  (1, SPLITS[split], i): fixed evaluation sets
    edit_pairs(n, seed)        pair i from   (2, seed, i): DiffEdit evaluation pairs
A different first word keeps the three seed spaces apart, and one generator per index makes any
scene reachable without drawing the ones before it (resuming a training run costs nothing).
The held-out sets are prefixes of one fixed sequence: held_out_scenes("test", 100) is the start
of held_out_scenes("test", 1000).

Batches for training: `scene_batches(seed, batch_size)` yields images (B, 3, H, W) float32 in
[-1, 1] (the VAE's range) with their captions; about 1000 scenes/s in one process at 128x128
on a busy 2-core machine (`python -m minidiff.training.shapes.data` measures it).

References:
    the "shapes" toy datasets of compositional generation work, e.g. Johnson et al. 2017, CLEVR
    (procedural scenes with exact annotations), and DiffEdit (Couairon et al. 2023), whose mask
    quality this world measures against true masks.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from minidiff.errors import InputError

# ----------------------------------------------------------------------------------------------
# Vocabulary

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# Saturated, well separated colours whose names a child would use.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 225, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 10),
}

# Flat light backgrounds, far from every object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "gray": (190, 190, 190),
    "beige": (240, 228, 200),
}

SPLITS: dict[str, int] = {"val": 1, "test": 2}  # held-out evaluation sets
_TRAIN, _HELD_OUT, _EDIT = 0, 1, 2  # first seed word of each seed space

DEFAULT_SIZE = 128
SUPERSAMPLE = 4  # sub-pixels per side for anti-aliasing and coverage
OBJECT_MARGIN = 4.0  # px at 128x128 between circumscribed circles (and to the image border: 2 px)
SIZE_RANGE = {1: (36.0, 60.0), 2: (32.0, 50.0)}  # circle diameter range at 128x128, by object count
# A triangle or star fills far less of its circumscribed circle than a circle does (area 0.33 d^2
# against 0.79 d^2), so they are drawn bigger to look about as big and survive the VAE's blur.
SHAPE_SCALE = {"circle": 1.0, "square": 1.1, "triangle": 1.25, "star": 1.25}
STAR_INNER_RATIO = 0.45  # inner / outer radius (a regular pentagram has 0.382; fatter survives blur)
CIRCLE_VERTICES = 128

SINGLE_TEMPLATES = (
    "{a} on a {bg} background",
    "{a}",
    "a picture of {a} on a {bg} background",
)
PAIR_TEMPLATES = (
    "{a} and {b} on a {bg} background",
    "{a} next to {b} on a {bg} background",
    "{a} and {b}",
)


def object_phrase(colour: str, shape: str) -> str:
    """'a red circle', 'an orange star'."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


def describe(objects: list[tuple[str, str]], background: str, template: int = 0) -> str:
    """Caption for [(colour, shape), ...] on `background`; template 0 is the canonical prompt."""
    if len(objects) not in (1, 2):
        raise InputError(f"A shapes scene holds one or two objects; got {len(objects)}.")
    templates = SINGLE_TEMPLATES if len(objects) == 1 else PAIR_TEMPLATES
    if not 0 <= template < len(templates):
        raise InputError(f"template must be in 0..{len(templates) - 1}; got {template}.")
    phrases = [object_phrase(c, s) for c, s in objects]
    return templates[template].format(a=phrases[0], b=phrases[-1], bg=background)


# ----------------------------------------------------------------------------------------------
# Scenes


@dataclasses.dataclass
class ShapeObject:
    """One object: what it is, where it is, and its exact mask (H, W) bool."""

    shape: str
    colour: str
    centre: tuple[float, float]  # (x, y) in pixels; pixel (i, j) covers [j, j+1) x [i, i+1)
    size: float  # diameter of the circumscribed circle, pixels
    rotation: float  # degrees, counter-clockwise on screen
    mask: np.ndarray  # (H, W) bool: coverage >= 1/2
    coverage: np.ndarray  # (H, W) float32 in [0, 1]: fraction of the pixel inside the shape
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the mask, x1/y1 exclusive

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def polygon(self) -> np.ndarray:
        """The outline in pixel coordinates, (V, 2) of (x, y)."""
        return shape_polygon(self.shape, self.centre, self.size / 2, self.rotation)


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8, anti-aliased
    caption: str
    objects: list[ShapeObject]
    background: str

    @property
    def size(self) -> int:
        return self.image.shape[0]

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return BACKGROUNDS[self.background]

    def pil(self) -> PIL.Image.Image:
        return PIL.Image.fromarray(self.image)

    def to_tensor(self) -> torch.Tensor:
        """(3, H, W) float32 in [-1, 1]."""
        return scenes_to_tensor([self])[0]

    def hard_image(self) -> np.ndarray:
        """The un-antialiased render: mask pixels have the object colour, all others background."""
        out = np.empty_like(self.image)
        out[:] = self.background_rgb
        for obj in self.objects:
            out[obj.mask] = obj.rgb
        return out

    def object_pairs(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]

    def object_specs(self) -> list[dict]:
        """The objects as `render` takes them (shape, colour, centre, size, rotation), to redraw the
        scene with some of them changed."""
        return [{"shape": o.shape, "colour": o.colour, "centre": o.centre, "size": o.size, "rotation": o.rotation}
                for o in self.objects]


def shape_polygon(shape: str, centre: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    """Vertices (V, 2) of `shape` with circumradius `radius`; rotation 0 points a corner upwards
    (square: flat top)."""
    if shape == "circle":
        angles = np.arange(CIRCLE_VERTICES) * (2 * math.pi / CIRCLE_VERTICES)
        radii = np.full(CIRCLE_VERTICES, radius)
    elif shape == "square":
        angles = math.pi / 4 + np.arange(4) * (math.pi / 2)
        radii = np.full(4, radius)
    elif shape == "triangle":
        angles = math.pi / 2 + np.arange(3) * (2 * math.pi / 3)
        radii = np.full(3, radius)
    elif shape == "star":
        angles = math.pi / 2 + np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * STAR_INNER_RATIO)
    else:
        raise InputError(f"Unknown shape {shape!r}; the shapes world knows {list(SHAPES)}.")
    angles = angles + math.radians(rotation)
    # Screen y grows downwards, so "up" is -y and counter-clockwise turns negate the sine.
    x = centre[0] + radii * np.cos(angles)
    y = centre[1] - radii * np.sin(angles)
    return np.stack([x, y], axis=1)


def _coverage(polygon: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Fraction of each pixel inside `polygon`, from a SUPERSAMPLE x supersampled drawing.

    Only the polygon's bounding box (x0, y0, x1, y1) is drawn and returned, with the coverage
    (y1 - y0, x1 - x0) there; everywhere else the coverage is 0. This keeps a scene at about a
    millisecond."""
    s = SUPERSAMPLE
    x0 = max(int(math.floor(polygon[:, 0].min())) - 1, 0)
    y0 = max(int(math.floor(polygon[:, 1].min())) - 1, 0)
    x1 = min(int(math.ceil(polygon[:, 0].max())) + 1, size)
    y1 = min(int(math.ceil(polygon[:, 1].max())) + 1, size)
    canvas = PIL.Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    # PIL fills the sub-pixels whose centres lie inside the polygon; sub-pixel (u, v) has its
    # centre at ((u + 0.5) / s, (v + 0.5) / s) in output pixels, hence the -0.5 shift.
    points = ((polygon - (x0, y0)) * s - 0.5).ravel().tolist()
    PIL.ImageDraw.Draw(canvas).polygon(points, fill=1)
    sub = np.asarray(canvas)  # (h*s, w*s) of 0/1
    counts = sub.reshape(y1 - y0, s, x1 - x0, s).sum(axis=(1, 3), dtype=np.int32)  # (h, s, w, s) -> (h, w)
    return counts.astype(np.float32) * (1.0 / (s * s)), (x0, y0, x1, y1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def render(objects: list[dict], background: str, caption: str | None = None, size: int = DEFAULT_SIZE) -> Scene:
    """Draw objects given as dicts {shape, colour, centre, size, rotation} (pixels, degrees).

    Objects must not overlap (make_scene guarantees it); `caption` defaults to the canonical one.
    """
    if background not in BACKGROUNDS:
        raise InputError(f"Unknown background {background!r}; choose from {list(BACKGROUNDS)}.")
    bg = np.asarray(BACKGROUNDS[background], np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = bg
    placed = []
    for spec in objects:
        if spec["colour"] not in COLOURS:
            raise InputError(f"Unknown colour {spec['colour']!r}; choose from {list(COLOURS)}.")
        poly = shape_polygon(spec["shape"], spec["centre"], spec["size"] / 2, spec["rotation"])
        c, (x0, y0, x1, y1) = _coverage(poly, size)
        cov = np.zeros((size, size), np.float32)
        cov[y0:y1, x0:x1] = c
        mask = cov >= 0.5
        if not mask.any():
            raise InputError(f"Object {spec} covers no pixel of a {size}x{size} image.")
        # Disjoint objects: adding each one's share is the same as alpha-compositing them.
        image[y0:y1, x0:x1] += c[..., None] * (np.asarray(COLOURS[spec["colour"]], np.float32) - bg)
        placed.append(ShapeObject(spec["shape"], spec["colour"], tuple(map(float, spec["centre"])),
                                  float(spec["size"]), float(spec["rotation"]), mask, cov, _bbox(mask)))
    if caption is None:
        caption = describe([(o.colour, o.shape) for o in placed], background)
    image = np.rint(image).astype(np.uint8)  # a convex mix of 0..255 colours: no clipping needed
    return Scene(image, caption, placed, background)


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (int, np.integer, tuple, list)):
        return np.random.default_rng(rng_or_seed)
    raise InputError(f"Expected a numpy Generator, an int seed or a tuple of ints; got {type(rng_or_seed).__name__}.")


def sample_objects(rng: np.random.Generator, num_objects: int, size: int = DEFAULT_SIZE) -> list[dict]:
    """Random object specs: distinct (shape, colour), non-overlapping circumscribed circles.

    Sizes and positions of all objects are drawn together and redrawn until the circles are
    OBJECT_MARGIN apart (a few tries on average; two big stars need the most)."""
    scale = size / DEFAULT_SIZE
    lo, hi = SIZE_RANGE[num_objects]
    margin = OBJECT_MARGIN * scale
    kinds: list[tuple[str, str]] = []
    while len(kinds) < num_objects:
        kind = (SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))])
        if kind not in kinds:
            kinds.append(kind)
    for _attempt in range(10_000):
        diameters = rng.uniform(lo, hi, num_objects) * [SHAPE_SCALE[s] for s, _ in kinds] * scale
        r = diameters / 2
        centres = rng.uniform(r[:, None] + margin / 2, size - r[:, None] - margin / 2, (num_objects, 2))
        if num_objects == 1 or math.dist(centres[0], centres[1]) >= r[0] + r[1] + margin:
            break
    else:  # the odds of reaching this are far below 1e-100
        raise RuntimeError("Could not place the objects without overlap.")
    rotations = rng.uniform(0.0, 360.0, num_objects)
    return [{"shape": shape, "colour": colour, "centre": (float(c[0]), float(c[1])), "size": float(d),
             "rotation": float(rot)}
            for (shape, colour), c, d, rot in zip(kinds, centres, diameters, rotations)]


def make_scene(rng_or_seed=0, num_objects: int | None = None, size: int = DEFAULT_SIZE,
               template: int | None = None) -> Scene:
    """One random scene. `num_objects` None draws 1 or 2 with equal odds; `template` None draws
    a caption template (0 = canonical)."""
    if num_objects not in (None, 1, 2):
        raise InputError(f"num_objects must be 1, 2 or None (random); got {num_objects}.")
    if size < 32:
        raise InputError(f"Scenes need size >= 32 pixels for recognisable objects; got {size}.")
    specs, background, caption = _scene_spec(_as_rng(rng_or_seed), num_objects, size, template)
    return render(specs, background, caption, size)


def _scene_spec(rng: np.random.Generator, num_objects: int | None, size: int, template: int | None):
    """make_scene's random draws, without the drawing: (object specs, background, caption)."""
    n = int(rng.integers(1, 3)) if num_objects is None else num_objects
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    specs = sample_objects(rng, n, size)
    templates = SINGLE_TEMPLATES if n == 1 else PAIR_TEMPLATES
    t = int(rng.integers(len(templates))) if template is None else template
    return specs, background, describe([(s["colour"], s["shape"]) for s in specs], background, t)


# ----------------------------------------------------------------------------------------------
# Streams and evaluation sets


def scene_stream(seed: int = 0, num_objects: int | None = None, size: int = DEFAULT_SIZE,
                 start: int = 0) -> Iterator[Scene]:
    """The infinite training stream: scene i is drawn from its own generator (0, seed, i)."""
    i = start
    while True:
        yield training_scene(seed, i, size, num_objects)
        i += 1


# The training streams of the family: the VAE reads stream 0, CLIP 1, the UNet 2 (each loop's
# seed + its offset); the prior reads this one.
SHAPES_TRAIN_SEED = 3


def training_scene(seed: int, i: int, size: int = DEFAULT_SIZE, num_objects: int | None = None) -> Scene:
    """Scene i of training stream `seed` (what scene_stream(seed) yields i-th)."""
    return make_scene(np.random.default_rng((_TRAIN, seed, i)), num_objects, size)


def training_caption(seed: int, i: int, size: int = DEFAULT_SIZE) -> str:
    """The caption of training_scene(seed, i), without drawing the scene."""
    return _scene_spec(np.random.default_rng((_TRAIN, seed, i)), None, size, None)[2]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"Unknown split {split!r}; held-out splits are {list(SPLITS)}.")


def held_out_scenes(split: str = "test", n: int = 1000, num_objects: int | None = None,
                    size: int = DEFAULT_SIZE) -> list[Scene]:
    """The first n scenes of a fixed evaluation set ("val" or "test"), never in any training
    stream (a separate seed space). Captions use the canonical template."""
    _check_split(split)  # before the loop: n = 0 with a wrong split is still refused
    return [held_out_scene(split, i, size, num_objects) for i in range(n)]


def held_out_scene(split: str, i: int, size: int = DEFAULT_SIZE, num_objects: int | None = None) -> Scene:
    """Scene i of held_out_scenes(split, ...), on its own."""
    _check_split(split)
    return make_scene(np.random.default_rng((_HELD_OUT, SPLITS[split], i)), num_objects, size, template=0)


def swappable_scenes(split: str, n: int, size: int = DEFAULT_SIZE) -> list[Scene]:
    """The first n two-object held-out scenes whose objects differ in both colour and shape, so
    that swapping their colours changes what the caption says (the binding tests)."""
    scenes = held_out_scenes(split, 4 * n, num_objects=2, size=size)
    return [s for s in scenes if len({o.colour for o in s.objects}) == 2 and len({o.shape for o in s.objects}) == 2][:n]


@dataclasses.dataclass
class EditPair:
    """A DiffEdit evaluation case: change object `index` of `scene` into target_colour target_shape.

    `target_scene` is the ideal result (the object redrawn at the same centre, size and rotation,
    everything else identical); `changed_mask` = source mask | target mask, the pixels an ideal
    edit changes. `kind` is "colour", "shape" or "both"."""

    scene: Scene
    index: int
    target_shape: str
    target_colour: str
    source_prompt: str
    target_prompt: str
    kind: str
    target_scene: Scene

    @property
    def source_object(self) -> ShapeObject:
        return self.scene.objects[self.index]

    @property
    def changed_mask(self) -> np.ndarray:
        return self.scene.objects[self.index].mask | self.target_scene.objects[self.index].mask


EDIT_KINDS = ("colour", "shape", "both")


def edit_pairs(n: int = 100, seed: int = 0, num_objects: int | None = None, size: int = DEFAULT_SIZE) -> list[EditPair]:
    """n DiffEdit cases from seed space (2, seed, i), apart from training and held-out scenes.

    The kind of edit cycles through colour, shape, both (so each is a third of the set); the
    target differs from the source in what the kind says, and from the other object of a
    two-object scene in (shape, colour), so both prompts stay unambiguous."""
    pairs = []
    for i in range(n):
        rng = np.random.default_rng((_EDIT, seed, i))
        scene = make_scene(rng, num_objects, size, template=0)
        index = int(rng.integers(len(scene.objects)))
        obj = scene.objects[index]
        others = {(o.shape, o.colour) for j, o in enumerate(scene.objects) if j != index}
        kind = EDIT_KINDS[i % 3]
        while True:
            shape = SHAPES[rng.integers(len(SHAPES))] if kind != "colour" else obj.shape
            colour = list(COLOURS)[rng.integers(len(COLOURS))] if kind != "shape" else obj.colour
            if ((kind == "colour" or shape != obj.shape) and (kind == "shape" or colour != obj.colour)
                    and (shape, colour) not in others):
                break
        specs = scene.object_specs()
        specs[index].update(shape=shape, colour=colour)
        target = render(specs, scene.background, size=size)
        pairs.append(EditPair(scene, index, shape, colour, scene.caption, target.caption, kind, target))
    return pairs


# ----------------------------------------------------------------------------------------------
# Batches


def scenes_to_tensor(scenes: list[Scene]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1]."""
    # numpy, one thread: on a busy 2-core machine this is several times faster than torch ops.
    x = np.stack([s.image for s in scenes]).transpose(0, 3, 1, 2).astype(np.float32)  # (B, H, W, 3) -> (B, 3, H, W)
    x *= 1.0 / 127.5
    x -= 1.0
    return torch.from_numpy(x)


@dataclasses.dataclass
class SceneBatch:
    images: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1]
    captions: list[str]
    scenes: list[Scene]


def scene_batches(seed: int = 0, batch_size: int = 32, num_objects: int | None = None,
                  size: int = DEFAULT_SIZE, start: int = 0) -> Iterator[SceneBatch]:
    """Consecutive batches of the training stream; batch k holds scenes start + k*B ... + B - 1."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1; got {batch_size}.")
    stream = scene_stream(seed, num_objects, size, start)
    while True:
        scenes = [next(stream) for _ in range(batch_size)]
        yield SceneBatch(scenes_to_tensor(scenes), [s.caption for s in scenes], scenes)


if __name__ == "__main__":  # speed check: python -m minidiff.training.shapes.data
    batches = scene_batches(0, 64)
    next(batches)
    t0 = time.perf_counter()
    for _ in range(20):
        next(batches)
    dt = time.perf_counter() - t0
    print(f"{20 * 64 / dt:.0f} scenes/s at {DEFAULT_SIZE}x{DEFAULT_SIZE} (batches of 64, one process)")
