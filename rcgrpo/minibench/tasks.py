"""MiniBench tasks: procedural Add / Remove / Replace edits of simple shapes on textured backgrounds.

Every example is rendered from one integer *example seed* (numpy, no files): a desaturated textured
background (linear or radial gradient, stripes, checks or smooth noise), zero to two distractor objects
and, for remove/replace, the target object, each a flat saturated shape (square, circle, triangle,
diamond, cross; six colours) placed in one cell of a 3×3 grid. The edit is then applied to the scene
description and rendered again, which gives the exact ground truth:

- ``add``:     "add a red circle in the top left"      (the instruction names the cell: Kontext sees no mask)
- ``remove``:  "remove the blue square"                (the object is unique in the scene)
- ``replace``: "replace the green triangle with a yellow cross" (new colour, new shape, or both)

The edit mask is the target's bounding box (old and new object, for replace) grown by a margin of
``MASK_MARGIN`` × the image size, as CompBench's masks are boxes around the edited object. The local
caption (CompBench's LC-T text) describes the mask region after the edit: "a red circle" for add and
replace, "a striped background" (the background's kind) for remove.

Geometry is drawn in normalized coordinates, so one example seed gives the same scene at any ``size``
(pixel boxes in the spec are those of the rendered ``size``). Splits: ``example_seed(base_seed, split,
index, task)`` hashes its arguments and puts the split in the lowest bits: train seeds are even (a 62-bit
hash shifted by one, unchanged since the tiny editor and the tiny CLIP were pretrained on them),
validation seeds end in binary 01 and test seeds in 11 (a 61-bit hash shifted by two). So train, val and
test never share an example seed, whatever the base seeds and indices are, and every seed is < 2^63.
``"heldout"``, the name of the single odd split before val and test existed, is an alias of ``"val"``
everywhere a split is named (datasets, ``example_seed``, ``generate_example``); metadata and example ids
carry the canonical name.

Public API:
    TASKS, SHAPES, COLORS, BACKGROUNDS, SPLITS, MASK_MARGIN, DEFAULT_SIZE
    example_seed(base_seed, split, index, task=None) -> int; split_of_seed(seed) -> str;
    canonical_split(split) -> str ("heldout" → "val")
    generate_example(seed, *, task=None, size=DEFAULT_SIZE, split=None, example_id=None) -> MiniBenchExample
    MiniBenchDataset(n=None, *, split="train", seed=0, size=DEFAULT_SIZE, tasks=TASKS, per_task=None)
    shape_coverage(shape, cy, cx, r, height, width, supersample=4) -> np.ndarray [H, W] in [0, 1]
    render_edit(spec, size=None, *, color=None, shape=None, apply=True) -> Tensor [3, H, W]
        (the scene of a spec again, optionally with the new object's colour/shape changed: hard negatives)
    batch(examples) -> dict of stacked tensors; crop_box(image, box, out_size=None) (local-region crops)
    object_caption(color, shape), background_caption(kind), VOCABULARY (every word an instruction or
    caption can use)

A ``MiniBenchExample`` is what the trainer reads (``image`` [3,H,W] in [0,1], ``mask`` [H,W] with
1 = edit, ``instruction``, ``example_id``, ``metadata``) plus ``target`` (the ground-truth edit),
``caption``, ``task``. ``metadata`` is JSON-serializable: ``{"id", "task", "caption", "split",
"seed", "minibench": spec}``; the spec is what the programmatic reward reads (see ``MiniBenchExample``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

TASKS = ("add", "remove", "replace")
SHAPES = ("square", "circle", "triangle", "diamond", "cross")
# Saturated object colours (RGB in [0, 1]); backgrounds are desaturated so that objects stand out.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.97, 0.55, 0.08),
    "yellow": (0.93, 0.87, 0.14),
    "green": (0.12, 0.68, 0.20),
    "blue": (0.14, 0.30, 0.92),
    "purple": (0.58, 0.18, 0.78),
}
BACKGROUNDS = ("gradient", "radial", "stripes", "checks", "noise")
BACKGROUND_WORDS = {"gradient": "gradient", "radial": "radial", "stripes": "striped", "checks": "checkered",
                    "noise": "mottled"}
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"heldout": "val"}  # the old name of the odd seeds' split: old commands keep working
DEFAULT_SIZE = 32
MASK_MARGIN = 1.0 / 16.0  # mask margin around the object box, as a fraction of the image size
GRID = 3  # objects sit in the cells of a GRID × GRID grid
CELL_NAMES = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
# Instruction templates (the first of each list is the canonical one).
ADD_TEMPLATES = ("add {a} {color} {shape} {where}", "put {a} {color} {shape} {where}", "place {a} {color} {shape} {where}")
WHERE_TEMPLATES = {"center": "in the center", "top": "at the top", "bottom": "at the bottom", "left": "on the left",
                   "right": "on the right"}
REMOVE_TEMPLATES = ("remove the {color} {shape}", "delete the {color} {shape}", "erase the {color} {shape}",
                    "take away the {color} {shape}")
REPLACE_TEMPLATES = ("replace the {color} {shape} with {a2} {color2} {shape2}",
                     "turn the {color} {shape} into {a2} {color2} {shape2}",
                     "change the {color} {shape} to {a2} {color2} {shape2}")
# Object half-size r (normalized: fraction of the image size); cells are 1/3 wide.
RADIUS_RANGE = (0.10, 0.135)
JITTER = 0.015  # max offset of an object centre from its cell centre (normalized)
COLOR_JITTER = 0.04  # per-example jitter of an object's RGB (uniform, per channel)
_SPLIT_SALT = 0x5EED_B1A5
_TASK_CODES = {None: 0, "add": 1, "remove": 2, "replace": 3}

_words: set[str] = set()
for _tpl in ADD_TEMPLATES + REMOVE_TEMPLATES + REPLACE_TEMPLATES + tuple(WHERE_TEMPLATES.values()):
    _words.update(w for w in _tpl.split() if not w.startswith("{"))
for _row in CELL_NAMES:
    for _name in _row:
        _words.update(_name.split())
_words.update(SHAPES)
_words.update(COLORS)
_words.update(BACKGROUND_WORDS.values())
_words.update(("a", "an", "the", "background", "object", "shape"))
VOCABULARY: tuple[str, ...] = tuple(sorted(_words))
"""Every word a MiniBench instruction or caption can contain (for word-level tokenizers)."""
del _words, _tpl, _row, _name


def _check_task(task) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def canonical_split(split) -> str:
    """The split's canonical name ("heldout" → "val"); ValueError for an unknown split."""
    if isinstance(split, str) and split in SPLIT_ALIASES:
        return SPLIT_ALIASES[split]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'heldout', an alias of 'val'), got {split!r}")
    return split



def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int ≥ 16 (pixels), got {size!r}")
    return int(size)


def example_seed(base_seed: int, split: str, index: int, task: str | None = None) -> int:
    """The example seed of example `index` of `split` (drawn from `base_seed`, optionally per task).

    h = a 62-bit hash of (salt, base_seed, task, index); train: ``h << 1`` (even; the seeds the tiny
    editor and tiny CLIP were pretrained on), val: ``(h >> 1) << 2 | 0b01``, test: ``(h >> 1) << 2 | 0b11``.
    The low bits name the split, so the splits are disjoint for every pair of base seeds and indices.
    """
    split = canonical_split(split)
    if task is not None:
        _check_task(task)
    for name, value in (("base_seed", base_seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = np.random.SeedSequence([_SPLIT_SALT, int(base_seed), _TASK_CODES[task], int(index)]).generate_state(2)
    hashed = ((int(state[0]) << 32) | int(state[1])) >> 2  # 62 bits
    if split == "train":
        return hashed << 1
    return ((hashed >> 1) << 2) | (0b01 if split == "val" else 0b11)


def split_of_seed(seed: int) -> str:
    """The split an example seed belongs to (its low bits: …0 train, …01 val, …11 test)."""
    seed = int(seed)
    if seed & 1 == 0:
        return "train"
    return "val" if seed & 0b10 == 0 else "test"


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Point-in-shape test in object coordinates (u right, v down; the shape spans about [-1, 1]²)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "square":
        return (au <= 0.84) & (av <= 0.84)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "triangle":  # apex up, base down
        return (v <= 0.86) & (v >= -0.98) & (au <= (v + 0.98) / 1.84 * 1.0)
    if shape == "diamond":
        return au + av <= 1.06
    if shape == "cross":
        return ((au <= 0.34) & (av <= 1.0)) | ((av <= 0.34) & (au <= 1.0))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_coverage(shape: str, cy: float, cx: float, r: float, height: int, width: int,
                   supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage `[H, W]` float32 in [0, 1] of `shape` centred at pixel (cy, cx), half-size r px.

    Pixel (i, j) covers [i, i+1) × [j, j+1); each pixel is sampled on a supersample × supersample grid.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if not r > 0:
        raise ValueError(f"r must be positive, got {r!r}")
    s = int(supersample)
    offs = (np.arange(s, dtype=np.float32) + 0.5) / s
    ys = (np.arange(height, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1)
    xs = (np.arange(width, dtype=np.float32)[:, None] + offs[None, :]).reshape(-1)
    v = (ys[:, None] - cy) / r
    u = (xs[None, :] - cx) / r
    inside = _inside(shape, u, v).astype(np.float32)
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[:, None], c[None, :]


def _pastel(rng: np.random.Generator) -> np.ndarray:
    """A desaturated colour: grey level 0.3-0.75 plus a small tint."""
    grey = rng.uniform(0.3, 0.75)
    tint = rng.normal(0.0, 1.0, 3)
    tint = tint / (np.linalg.norm(tint) + 1e-8) * rng.uniform(0.0, 0.12)
    return np.clip(grey + tint, 0.05, 0.95)


def _draw_background(rng: np.random.Generator) -> dict:
    """Parameters of a random background (JSON-serializable)."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c0 = _pastel(rng)
    c1 = np.clip(c0 + rng.normal(0.0, 1.0, 3) * 0.05 + rng.uniform(-0.2, 0.2), 0.05, 0.95)
    p = {"kind": kind, "color0": [round(float(x), 4) for x in c0], "color1": [round(float(x), 4) for x in c1]}
    if kind == "gradient":
        p["angle"] = float(rng.uniform(0, 2 * np.pi))
    elif kind == "radial":
        p["center"] = [float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))]
        p["radius"] = float(rng.uniform(0.5, 1.0))
    elif kind == "stripes":
        p["angle"] = float(rng.uniform(0, np.pi))
        p["period"] = float(rng.uniform(0.14, 0.33))
        p["phase"] = float(rng.uniform(0, 2 * np.pi))
        p["amplitude"] = float(rng.uniform(0.35, 0.6))
    elif kind == "checks":
        p["period"] = float(rng.uniform(0.2, 0.4))
        p["offset"] = [float(rng.uniform(0, 1)), float(rng.uniform(0, 1))]
        p["amplitude"] = float(rng.uniform(0.3, 0.5))
    elif kind == "noise":
        cells = int(rng.integers(3, 6))
        p["cells"] = cells
        p["values"] = [round(float(x), 4) for x in rng.uniform(0, 1, (cells + 1) * (cells + 1))]
    p["grain_seed"] = int(rng.integers(2**31))
    p["grain"] = float(rng.uniform(0.0, 0.012))
    return p


def render_background(params: dict, size: int) -> np.ndarray:
    """`[H, W, 3]` float32 in [0, 1] from background parameters (see `_draw_background`)."""
    y, x = _grid(size)
    c0 = np.asarray(params["color0"], np.float32)
    c1 = np.asarray(params["color1"], np.float32)
    kind = params["kind"]
    if kind == "gradient":
        a = params["angle"]
        t = (np.cos(a) * (x - 0.5) + np.sin(a) * (y - 0.5)) / np.sqrt(0.5) + 0.5
    elif kind == "radial":
        cy, cx = params["center"]
        t = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / params["radius"]
    elif kind == "stripes":
        a = params["angle"]
        proj = np.cos(a) * x + np.sin(a) * y
        t = 0.5 + params["amplitude"] * np.sin(2 * np.pi * proj / params["period"] + params["phase"])
    elif kind == "checks":
        oy, ox = params["offset"]
        # a soft checkerboard: product of two smoothed square waves
        sy = np.tanh(4.0 * np.sin(2 * np.pi * (y / params["period"] + oy)))
        sx = np.tanh(4.0 * np.sin(2 * np.pi * (x / params["period"] + ox)))
        t = 0.5 + params["amplitude"] * sy * sx
    elif kind == "noise":
        n = params["cells"]
        grid = np.asarray(params["values"], np.float32).reshape(n + 1, n + 1)
        gy, gx = y * n, x * n
        iy, ix = np.clip(np.floor(gy).astype(int), 0, n - 1), np.clip(np.floor(gx).astype(int), 0, n - 1)
        fy, fx = gy - iy, gx - ix
        fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep
        t = (grid[iy, ix] * (1 - fy) * (1 - fx) + grid[iy + 1, ix] * fy * (1 - fx)
             + grid[iy, ix + 1] * (1 - fy) * fx + grid[iy + 1, ix + 1] * fy * fx)
    else:
        raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {kind!r}")
    t = np.clip(np.broadcast_to(t, (size, size)), 0.0, 1.0)[..., None]
    img = c0 * (1 - t) + c1 * t
    if params.get("grain", 0.0) > 0:
        grain = np.random.default_rng(params["grain_seed"]).normal(0.0, params["grain"], (size, size, 1))
        img = img + grain.astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _object_pixels(obj: dict, size: int) -> tuple[float, float, float]:
    """(cy, cx, r) in pixels at `size`."""
    return obj["center"][0] * size, obj["center"][1] * size, obj["radius"] * size


def object_box(obj: dict, size: int, margin: float = 0.0) -> list[int]:
    """Pixel box `[top, left, bottom, right]` (bottom/right exclusive) of an object grown by `margin`·size."""
    cy, cx, r = _object_pixels(obj, size)
    m = margin * size
    top = int(np.clip(np.floor(cy - r - m), 0, size))
    left = int(np.clip(np.floor(cx - r - m), 0, size))
    bottom = int(np.clip(np.ceil(cy + r + m), 0, size))
    right = int(np.clip(np.ceil(cx + r + m), 0, size))
    return [top, left, bottom, right]


def render_objects(background: np.ndarray, objects: list[dict]) -> np.ndarray:
    """Composite flat objects (in order) over a `[H, W, 3]` background."""
    img = background.copy()
    size = img.shape[0]
    for obj in objects:
        cy, cx, r = _object_pixels(obj, size)
        cov = shape_coverage(obj["shape"], cy, cx, r, size, size)[..., None]
        img = img * (1 - cov) + np.asarray(obj["rgb"], np.float32) * cov
    return img


def article(word: str) -> str:
    """"an" before a vowel, else "a"."""
    return "an" if word[:1] in "aeiou" else "a"


def object_caption(color: str, shape: str) -> str:
    """CompBench-style local caption of an object: "a red circle", "an orange square"."""
    return f"{article(color)} {color} {shape}"


def background_caption(kind: str) -> str:
    """Local caption of an emptied region: "a striped background"."""
    if kind not in BACKGROUND_WORDS:
        raise ValueError(f"background kind must be one of {BACKGROUNDS}, got {kind!r}")
    return f"a {BACKGROUND_WORDS[kind]} background"


def where_phrase(cell: tuple[int, int]) -> str:
    """"in the top left", "at the top", "in the center", ... for a grid cell (row, col)."""
    name = CELL_NAMES[cell[0]][cell[1]]
    return WHERE_TEMPLATES.get(name, f"in the {name}")


# ----------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------


@dataclass
class MiniBenchExample:
    """One MiniBench edit.

    image: source `[3, H, W]` float32 in [0, 1]; target: ground-truth edit, same shape;
    mask: `[H, W]` float32 (1 = edit region: the target's box grown by the margin);
    instruction, caption (local caption of the mask region after the edit), task, example_id;
    metadata (JSON-serializable): "id", "task", "caption", "split", "seed" and "minibench", the spec:
        {"version": 1, "task", "size", "instruction", "caption",
         "before": object or None (the object removed or replaced),
         "after": object or None (the object added, or the replacement),
         "objects": [objects in the source image, in drawing order],
         "background": background parameters ("kind", colours, ...),
         "mask_box": [top, left, bottom, right] (pixels at size, exclusive ends),
         "box": the target object's box (union of before/after for replace), "cell": [row, col],
         "where": the cell's phrase}
    where an object is {"shape", "color", "rgb", "center": [y, x] (normalized), "radius" (normalized),
    "box": [top, left, bottom, right] pixels at size, "cell": [row, col]}.
    """

    image: torch.Tensor
    target: torch.Tensor
    mask: torch.Tensor
    instruction: str
    caption: str
    task: str
    example_id: str
    metadata: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.example_id

    @property
    def ground_truth(self) -> torch.Tensor:
        return self.target

    @property
    def spec(self) -> dict:
        return self.metadata["minibench"]

    def to_dict(self) -> dict:
        return {"image": self.image, "target": self.target, "mask": self.mask, "instruction": self.instruction,
                "caption": self.caption, "task": self.task, "id": self.example_id, "metadata": self.metadata}


def _make_object(rng: np.random.Generator, cell: tuple[int, int], *, shape: str | None = None,
                 color: str | None = None, radius: float | None = None, center=None) -> dict:
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    color = color or list(COLORS)[int(rng.integers(len(COLORS)))]
    if radius is None:
        radius = float(rng.uniform(*RADIUS_RANGE))
    if center is None:
        cy = (cell[0] + 0.5) / GRID + float(rng.uniform(-JITTER, JITTER))
        cx = (cell[1] + 0.5) / GRID + float(rng.uniform(-JITTER, JITTER))
        center = [cy, cx]
    rgb = np.clip(np.asarray(COLORS[color]) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0.0, 1.0)
    return {"shape": shape, "color": color, "rgb": [round(float(c), 4) for c in rgb],
            "center": [round(float(center[0]), 5), round(float(center[1]), 5)], "radius": round(float(radius), 5),
            "cell": [int(cell[0]), int(cell[1])]}


def _with_boxes(obj: dict | None, size: int) -> dict | None:
    if obj is None:
        return None
    return {**obj, "box": object_box(obj, size)}


def generate_example(seed: int, *, task: str | None = None, size: int = DEFAULT_SIZE, split: str | None = None,
                     example_id: str | None = None) -> MiniBenchExample:
    """Render the example of example seed `seed` (deterministic; `task=None` draws the task from the seed).

    `split` is recorded in the metadata (default: the split of the seed's low bits, `split_of_seed`).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    size = _check_size(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x4D494E49]))
    drawn_task = TASKS[int(rng.integers(len(TASKS)))]
    task = drawn_task if task is None else _check_task(task)
    split = split_of_seed(seed) if split is None else canonical_split(split)
    background = _draw_background(rng)
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    order = rng.permutation(len(cells))
    n_distractors = int(rng.integers(0, 3))
    target_cell = cells[order[0]]
    distractors = [_make_object(rng, cells[order[1 + i]]) for i in range(n_distractors)]
    template_index = int(rng.integers(1 << 16))

    before = after = None
    if task == "add":
        after = _make_object(rng, target_cell)
        source_objects = list(distractors)
        target_objects = source_objects + [after]
        tpl = ADD_TEMPLATES[template_index % len(ADD_TEMPLATES)]
        instruction = tpl.format(a=article(after["color"]), color=after["color"], shape=after["shape"],
                                 where=where_phrase(target_cell))
        caption = object_caption(after["color"], after["shape"])
    else:
        before = _make_object(rng, target_cell)
        # distractors must not look like the target (the instruction names the object by colour and shape)
        for i, d in enumerate(distractors):
            while d["color"] == before["color"] and d["shape"] == before["shape"]:
                d = _make_object(rng, tuple(d["cell"]), radius=d["radius"], center=d["center"])
            distractors[i] = d
        source_objects = distractors + [before]
        if task == "remove":
            target_objects = list(distractors)
            tpl = REMOVE_TEMPLATES[template_index % len(REMOVE_TEMPLATES)]
            instruction = tpl.format(color=before["color"], shape=before["shape"])
            caption = background_caption(background["kind"])
        else:
            mode = int(rng.integers(3))  # 0: new colour, 1: new shape, 2: both
            new_shape, new_color = before["shape"], before["color"]
            if mode in (1, 2):
                new_shape = [s for s in SHAPES if s != before["shape"]][int(rng.integers(len(SHAPES) - 1))]
            if mode in (0, 2):
                new_color = [c for c in COLORS if c != before["color"]][int(rng.integers(len(COLORS) - 1))]
            after = _make_object(rng, target_cell, shape=new_shape, color=new_color, radius=before["radius"],
                                 center=before["center"])
            target_objects = distractors + [after]
            tpl = REPLACE_TEMPLATES[template_index % len(REPLACE_TEMPLATES)]
            instruction = tpl.format(color=before["color"], shape=before["shape"], a2=article(after["color"]),
                                     color2=after["color"], shape2=after["shape"])
            caption = object_caption(after["color"], after["shape"])

    bg = render_background(background, size)
    source = render_objects(bg, source_objects)
    target = render_objects(bg, target_objects)
    boxes = [object_box(o, size) for o in (before, after) if o is not None]
    box = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    mboxes = [object_box(o, size, MASK_MARGIN) for o in (before, after) if o is not None]
    mask_box = [min(b[0] for b in mboxes), min(b[1] for b in mboxes), max(b[2] for b in mboxes),
                max(b[3] for b in mboxes)]
    mask = np.zeros((size, size), np.float32)
    mask[mask_box[0]:mask_box[2], mask_box[1]:mask_box[3]] = 1.0

    example_id = example_id or f"minibench-{task}-{seed:016x}"
    spec = {
        "version": 1,
        "task": task,
        "size": size,
        "instruction": instruction,
        "caption": caption,
        "before": _with_boxes(before, size),
        "after": _with_boxes(after, size),
        "objects": [_with_boxes(o, size) for o in source_objects],
        "background": background,
        "mask_box": mask_box,
        "box": box,
        "cell": [int(target_cell[0]), int(target_cell[1])],
        "where": CELL_NAMES[target_cell[0]][target_cell[1]],
    }
    metadata = {"id": example_id, "task": task, "caption": caption, "split": split, "seed": int(seed),
                "minibench": spec}
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
    return MiniBenchExample(image=to_t(source), target=to_t(target), mask=torch.from_numpy(mask),
                            instruction=instruction, caption=caption, task=task, example_id=example_id,
                            metadata=metadata)


def render_edit(spec: dict, size: int | None = None, *, color: str | None = None, shape: str | None = None,
                apply: bool = True) -> torch.Tensor:
    """Render a spec's scene `[3, H, W]` in [0, 1]: the edited scene (`apply=True`, the ground truth when no
    override is given) or the source (`apply=False`). `color`/`shape` override the added or replacing
    object (add/replace only), e.g. to make wrong-colour or wrong-shape edits (hard negatives)."""
    size = _check_size(spec["size"] if size is None else size)
    if (color is not None or shape is not None) and spec.get("after") is None:
        raise ValueError(f"render_edit: color/shape overrides need an add or replace spec, got task {spec.get('task')!r}")
    if color is not None and color not in COLORS:
        raise ValueError(f"color must be one of {tuple(COLORS)}, got {color!r}")
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    objects = list(spec["objects"])
    if apply:
        if spec.get("before") is not None:
            objects = [o for o in objects if o != spec["before"]]
        if spec.get("after") is not None:
            after = dict(spec["after"])
            if color is not None:
                after["color"], after["rgb"] = color, list(COLORS[color])
            if shape is not None:
                after["shape"] = shape
            objects.append(after)
    img = render_objects(render_background(spec["background"], size), objects)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class MiniBenchDataset(Sequence):
    """A deterministic list-like dataset of MiniBench examples (rendered on access, cached).

    Either `n` examples with tasks in round-robin order over `tasks` (example i has task
    tasks[i % len(tasks)] and seed `example_seed(seed, split, i)`), or `per_task` examples of each task
    (task-major order; seeds `example_seed(seed, split, i, task)`, as `rcgrpo minibench make` uses).
    """

    def __init__(self, n: int | None = None, *, split: str = "train", seed: int = 0, size: int = DEFAULT_SIZE,
                 tasks: Sequence[str] = TASKS, per_task: int | None = None, cache: bool = True):
        self.split = canonical_split(split)
        self.size = _check_size(size)
        if isinstance(tasks, str):
            tasks = (tasks,)
        self.tasks = tuple(_check_task(t) for t in tasks)
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        if (n is None) == (per_task is None):
            raise ValueError(f"give exactly one of n and per_task, got n={n!r}, per_task={per_task!r}")
        count = n if n is not None else per_task
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"{'n' if n is not None else 'per_task'} must be a non-negative int, got {count!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        if n is not None:
            self._keys = [(self.tasks[i % len(self.tasks)], example_seed(self.seed, split, i), i) for i in range(n)]
        else:
            self._keys = [(t, example_seed(self.seed, split, i, t), i) for t in self.tasks for i in range(per_task)]
        self._cache: dict[int, MiniBenchExample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def seeds(self) -> list[int]:
        """The example seeds, in order."""
        return [k[1] for k in self._keys]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)):
            raise TypeError(f"MiniBenchDataset indices must be ints or slices, got {type(idx).__name__}")
        i = int(idx)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {idx} out of range for a MiniBenchDataset of {len(self)} examples")
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        task, seed, j = self._keys[i]
        ex = generate_example(seed, task=task, size=self.size, split=self.split,
                              example_id=f"{self.split}-{task}-{j:05d}")
        if self._cache is not None:
            self._cache[i] = ex
        return ex


def batch(examples: Sequence[MiniBenchExample]) -> dict:
    """Stack examples: {"image", "target" [B,3,H,W], "mask" [B,1,H,W], "instruction", "metadata" (lists)}."""
    if not examples:
        raise ValueError("batch: no examples")
    return {
        "image": torch.stack([e.image for e in examples]),
        "target": torch.stack([e.target for e in examples]),
        "mask": torch.stack([e.mask for e in examples])[:, None],
        "instruction": [e.instruction for e in examples],
        "metadata": [e.metadata for e in examples],
    }


def crop_box(image: torch.Tensor, box, out_size: int | None = None) -> torch.Tensor:
    """Crop `[3, H, W]` (or `[B, 3, H, W]`) to a pixel box [top, left, bottom, right]; optionally resize
    (bilinear, antialiased) to `out_size`² — e.g. the local region for LC-I/LC-T crops."""
    top, left, bottom, right = (int(v) for v in box)
    if not (0 <= top < bottom <= image.shape[-2] and 0 <= left < right <= image.shape[-1]):
        raise ValueError(f"crop_box: box {list(box)} is empty or outside an image of {tuple(image.shape[-2:])}")
    crop = image[..., top:bottom, left:right]
    if out_size is not None:
        x = crop if crop.dim() == 4 else crop[None]
        x = torch.nn.functional.interpolate(x.float(), size=(out_size, out_size), mode="bilinear",
                                            align_corners=False, antialias=True)
        crop = x if crop.dim() == 4 else x[0]
    return crop
