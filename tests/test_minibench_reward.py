"""The programmatic MiniBench reward: ordering of correct / source / wrong edits, bounds, smoothness."""
import json

import pytest
import torch

from rcgrpo.minibench import tasks as T
from rcgrpo.minibench.reward import minibench_reward, minibench_reward_terms


def _batch(task, n=12, size=64, seed=3):
    exs = [T.generate_example(T.example_seed(seed, "val", i, task), task=task, size=size) for i in range(n)]
    return exs, T.batch(exs)


def _score(images, b):
    return minibench_reward(images, b["image"], b["mask"], b["instruction"], b["metadata"])


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("task", T.TASKS)
def test_ground_truth_beats_source_and_wrong_edits(task, size):
    exs, b = _batch(task, size=size)
    gt, src = _score(b["target"], b), _score(b["image"], b)
    assert gt.dtype == torch.float32 and gt.shape == (len(exs),)
    assert bool((gt > src + 0.05).all()), (gt - src).min()
    assert float(gt.mean()) > 0.8 if size == 64 else float(gt.mean()) > 0.65
    assert float(src.mean()) < 0.5 and float(src.max()) < 0.7
    if task in ("add", "replace"):
        wrong_color, wrong_shape = [], []
        for e in exs:
            after = e.spec["after"]
            other_color = next(c for c in T.COLORS if c != after["color"])
            other_shape = next(s for s in T.SHAPES if s != after["shape"])
            wrong_color.append(T.render_edit(e.spec, color=other_color))
            wrong_shape.append(T.render_edit(e.spec, shape=other_shape))
        wc, ws = _score(torch.stack(wrong_color), b), _score(torch.stack(wrong_shape), b)
        assert bool((gt > wc + 0.05).all()), (gt - wc).min()
        assert bool((gt > ws + 0.02).all()), (gt - ws).min()
    # noise in the mask is not an edit
    noisy = b["image"] * (1 - b["mask"]) + torch.rand_like(b["image"]) * b["mask"]
    assert float(_score(noisy, b).max()) < 0.2


@pytest.mark.parametrize("task", T.TASKS)
def test_reward_is_bounded_and_graded(task):
    exs, b = _batch(task, n=8, seed=11)
    values = []
    for a in torch.linspace(0, 1, 6):
        blend = (1 - a) * b["image"] + a * b["target"]
        r = _score(blend, b)
        assert bool(((r >= 0) & (r <= 1)).all())
        values.append(r)
    values = torch.stack(values)  # [6, B]
    # partial edits get partial credit: intermediate blends fall strictly between the ends on average
    mid = values[1:-1].mean(1)
    assert float(values[0].mean()) < float(mid.min()) and float(mid.max()) < float(values[-1].mean())
    assert len(torch.unique((values * 1000).round())) > 12  # not a 0/1 score
    # a blurred (imperfect) correct edit scores between the source and the sharp one, on average
    blurred = torch.nn.functional.avg_pool2d(b["target"], 3, 1, 1, count_include_pad=False)
    rb = _score(blurred, b)
    assert float(values[0].mean()) < float(rb.mean()) <= float(values[-1].mean()) + 0.02


def test_needs_no_ground_truth_and_accepts_json_spec():
    exs, b = _batch("replace", n=4)
    r = _score(b["target"], b)
    meta = [{"minibench": json.dumps(m["minibench"]), "reference": "/nonexistent.png"} for m in b["metadata"]]
    r2 = minibench_reward(b["target"], b["image"], b["mask"], b["instruction"], meta)
    assert torch.allclose(r, r2)
    terms = minibench_reward_terms(b["target"], b["image"], b["mask"], b["instruction"], b["metadata"])
    assert torch.allclose(terms["reward"], r) and {"object", "rest", "cleared"} <= set(terms)
    assert getattr(minibench_reward, "name", None) == "minibench"


def test_bad_input_names_the_problem():
    exs, b = _batch("add", n=2)
    with pytest.raises(ValueError, match="minibench"):
        minibench_reward(b["target"], b["image"], b["mask"], b["instruction"], [{}, {}])
    with pytest.raises(ValueError, match="task"):
        bad = [{"minibench": {**m["minibench"], "task": "move"}} for m in b["metadata"]]
        minibench_reward(b["target"], b["image"], b["mask"], b["instruction"], bad)
    with pytest.raises(ValueError, match="masks"):
        minibench_reward(b["target"], b["image"], b["mask"][:, :, :3], b["instruction"], b["metadata"])
    with pytest.raises(ValueError, match="empty mask"):
        minibench_reward(b["target"], b["image"], torch.zeros_like(b["mask"]), b["instruction"], b["metadata"])
