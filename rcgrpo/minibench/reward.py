"""The programmatic MiniBench task reward: EditScore's role on MiniBench, from the example's spec only.

    minibench_reward(edited [B,3,H,W], sources [B,3,H,W], masks [B,1,H,W], instructions, metadata) -> [B] in [0, 1]

Each example's `metadata["minibench"]` (the spec written by `rcgrpo.minibench.tasks`; a JSON string is
accepted too) says what should be inside the mask. The ground-truth image is never used. Terms, each in
[0, 1] and smooth in the pixels:

- **object** (add, replace): a soft colour map `p(x) = exp(−‖e(x) − rgb(colour)‖² / (2 s²))` of the
  requested colour (palette value, s = `color_sigma`) over the mask, compared with the templates of
  every shape kind drawn at the object's place and size: `IoU_k = Σ p·O_k / Σ (p + O_k − p·O_k)`.
  object = IoU_target · (1 − w + w · softmax_k(β · IoU_k)[target]): the right colour where the right
  shape is, and, for the share w = `shape_weight` of the credit, a shape more like the requested kind
  than like the others (β = `shape_beta`). A right-coloured blob in the right place gets partial credit.
- **gone** (remove, and the part of a replaced object the new one does not cover): `1 − mean p_old`
  over that region, the old colour is no longer there.
- **fill** (same region): it looks like the surrounding background, `exp(−mse / tau_fill)` against a
  quadratic fit (per channel) to the source's background pixels around the mask (objects excluded).
  **cleared** = gone · fill (an emptied region must be both free of the old colour and background-like,
  so noise does not pass as a removal).
- **rest** (every task): the rest of the mask keeps the source's background,
  `exp(−mse(edited, source) / tau_rest)` over the mask minus the old and new objects.

Score = weighted mean of the terms present (weights in `TERM_WEIGHTS`, renormalized over the terms an
example has). The source image scores the rest term only (about 0.3-0.45); a correct edit close to 1.
`minibench_reward_terms(...)` returns every term for logging and tests.
"""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from .tasks import COLORS, SHAPES, shape_coverage

TERM_WEIGHTS = {
    "add": {"object": 0.6, "rest": 0.4},
    "remove": {"cleared": 0.7, "rest": 0.3},
    "replace": {"object": 0.5, "cleared": 0.2, "rest": 0.3},
}
COLOR_SIGMA = 0.13
SHAPE_BETA = 25.0
SHAPE_WEIGHT = 0.5  # object = IoU · (1 − w + w · P(shape)): half the credit needs the right shape kind
TAU_REST = 0.01
TAU_FILL = 0.02
MIN_REGION_PIXELS = 2.0  # a region (gone/fill/rest) smaller than this many pixels is left out


def _spec_of(meta, index: int) -> dict:
    if not isinstance(meta, dict):
        raise ValueError(f"minibench_reward: metadata[{index}] must be a dict, got {type(meta).__name__}")
    spec = meta.get("minibench")
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"minibench_reward: metadata[{index}]['minibench'] is not valid JSON ({exc})") from None
    if not isinstance(spec, dict):
        ident = meta.get("id", index)
        raise ValueError(
            f"minibench_reward: metadata[{index}] (example {ident!r}) has no 'minibench' spec; the reward "
            "needs MiniBench examples (rcgrpo.minibench.tasks) or a MiniBench metadata.json"
        )
    task = spec.get("task")
    if task not in TERM_WEIGHTS:
        raise ValueError(f"minibench_reward: metadata[{index}] spec has task {task!r}, expected one of {tuple(TERM_WEIGHTS)}")
    for key in (("after",) if task == "add" else ("before",) if task == "remove" else ("before", "after")):
        obj = spec.get(key)
        if not isinstance(obj, dict) or not {"shape", "color", "center", "radius"} <= set(obj):
            raise ValueError(f"minibench_reward: metadata[{index}] {task} spec needs a {key!r} object with "
                             f"shape, color, center and radius")
        if obj["shape"] not in SHAPES or obj["color"] not in COLORS:
            raise ValueError(f"minibench_reward: metadata[{index}] {key!r} object has unknown shape/colour "
                             f"{obj['shape']!r}/{obj['color']!r}")
    return spec


@lru_cache(maxsize=4096)
def _template(shape: str, cy: float, cx: float, r: float, height: int, width: int) -> torch.Tensor:
    return torch.from_numpy(shape_coverage(shape, cy, cx, r, height, width))


def _templates(obj: dict, height: int, width: int) -> dict[str, torch.Tensor]:
    cy, cx = obj["center"][0] * height, obj["center"][1] * width
    r = obj["radius"] * (height + width) / 2
    return {s: _template(s, round(cy, 4), round(cx, 4), round(r, 4), height, width) for s in SHAPES}


def _dilate(x: torch.Tensor, px: int) -> torch.Tensor:
    if px <= 0:
        return x
    return torch.nn.functional.max_pool2d(x[None, None], 2 * px + 1, stride=1, padding=px)[0, 0]


def _color_map(img: torch.Tensor, color: str, sigma: float) -> torch.Tensor:
    rgb = torch.tensor(COLORS[color], dtype=img.dtype)[:, None, None]
    return torch.exp(-(img - rgb).square().sum(0) / (2 * sigma * sigma))


def _background_fit(source: torch.Tensor, known: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """A quadratic (per channel) fit `[3, H, W]` to source pixels where `known` (background) inside `window`."""
    h, w = source.shape[-2:]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64), torch.linspace(-1, 1, w, dtype=torch.float64),
                            indexing="ij")
    basis = torch.stack([torch.ones_like(yy), yy, xx, yy * yy, yy * xx, xx * xx], -1).reshape(-1, 6)
    sel = ((known > 0.5) & (window > 0.5)).reshape(-1)
    src = source.double().reshape(3, -1).T
    if int(sel.sum()) < 24:
        sel = (known > 0.5).reshape(-1)
    if int(sel.sum()) < 6:
        return source.mean((1, 2), keepdim=True).expand_as(source).clone()
    a, b = basis[sel], src[sel]
    # ridge-regularized normal equations (stable with few pixels)
    coef = torch.linalg.solve(a.T @ a + 1e-4 * torch.eye(6, dtype=a.dtype), a.T @ b)
    return (basis @ coef).T.reshape(3, h, w).clamp(0, 1).to(source.dtype)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-8)


def minibench_reward_terms(edited, sources, masks, instructions=None, metadata=None, *,
                           color_sigma: float = COLOR_SIGMA, shape_beta: float = SHAPE_BETA,
                           tau_rest: float = TAU_REST, tau_fill: float = TAU_FILL,
                           shape_weight: float = SHAPE_WEIGHT) -> dict[str, torch.Tensor]:
    """Every term `[B]` (NaN where a task has no such term) and the total `"reward"` `[B]`."""
    from ..rewards.checks import check_reward_inputs

    batch = check_reward_inputs(edited, sources, masks, instructions, metadata, name="minibench_reward")
    if masks is None or metadata is None:
        raise ValueError("minibench_reward: needs masks and metadata (with the MiniBench spec of each example)")
    specs = [_spec_of(m, i) for i, m in enumerate(metadata)]
    edited = edited.detach().float().cpu().clamp(0, 1)
    sources = sources.detach().float().cpu().clamp(0, 1)
    masks = masks.detach().float().cpu()
    _, _, h, w = edited.shape
    names = ("object", "shape_prob", "presence", "gone", "fill", "cleared", "rest", "reward")
    out = {k: torch.full((batch,), float("nan")) for k in names}
    antialias = max(1, round(max(h, w) / 32))
    for i, spec in enumerate(specs):
        task = spec["task"]
        e, s, m = edited[i], sources[i], (masks[i, 0] > 0.5).float()
        if float(m.sum()) < 1:
            raise ValueError(f"minibench_reward: example {i} has an empty mask")
        terms: dict[str, torch.Tensor] = {}
        before = spec.get("before") if task in ("remove", "replace") else None
        after = spec.get("after") if task in ("add", "replace") else None
        new_cov = torch.zeros(h, w)
        old_cov = torch.zeros(h, w)
        if after is not None:
            temps = _templates(after, h, w)
            new_cov = temps[after["shape"]]
            p = _color_map(e, after["color"], color_sigma) * m
            ious = []
            for shape in SHAPES:
                o = temps[shape] * m
                inter = (p * o).sum()
                union = (p + o - p * o).sum().clamp_min(1e-6)
                ious.append(inter / union)
            ious = torch.stack(ious)
            k = SHAPES.index(after["shape"])
            shape_prob = torch.softmax(shape_beta * ious, 0)[k]
            out["presence"][i], out["shape_prob"][i] = ious[k], shape_prob
            terms["object"] = ious[k] * (1 - shape_weight + shape_weight * shape_prob)
        if before is not None:
            old_cov = _templates(before, h, w)[before["shape"]]
            # the part of the old object that the new one does not cover (soft, in [0, 1])
            uncovered = (old_cov * (1 - _dilate(new_cov, antialias))) * m
            if float(uncovered.sum()) >= MIN_REGION_PIXELS:
                p_old = _color_map(e, before["color"], color_sigma)
                terms["gone"] = 1 - _weighted_mean(p_old, uncovered)
                objects = torch.zeros(h, w)
                for obj in spec.get("objects") or [before]:
                    objects = torch.maximum(objects, _templates(obj, h, w)[obj["shape"]])
                known = (1 - _dilate((objects > 0).float(), antialias)) * (1 - m)
                window = _dilate(m, max(2, round(0.1 * max(h, w))))
                bg = _background_fit(s, known, window)
                err = (e - bg).square().mean(0)
                terms["fill"] = torch.exp(-_weighted_mean(err, uncovered) / tau_fill)
                terms["cleared"] = terms["gone"] * terms["fill"]
        rest = m * (1 - _dilate(torch.maximum(old_cov, new_cov).gt(0).float(), antialias))
        if float(rest.sum()) >= MIN_REGION_PIXELS:
            err = (e - s).square().mean(0)
            terms["rest"] = torch.exp(-_weighted_mean(err, rest) / tau_rest)
        weights = {k: v for k, v in TERM_WEIGHTS[task].items() if k in terms}
        total = sum(weights.values())
        out["reward"][i] = sum(weights[k] * terms[k] for k in weights) / total
        for k, v in terms.items():
            out[k][i] = v
    return {k: v.float() for k, v in out.items()}


def minibench_reward(edited, sources, masks, instructions, metadata) -> torch.Tensor:
    """The MiniBench task reward `[B]` float32 in [0, 1] (see the module docstring)."""
    return minibench_reward_terms(edited, sources, masks, instructions, metadata)["reward"]


minibench_reward.name = "minibench"
