"""MiniBench task generator: determinism, split separation, geometry, the trainer's item contract."""
import json

import numpy as np
import pytest
import torch

from rcgrpo.minibench import tasks as T


def test_same_seed_same_example_and_different_seeds_differ():
    a = T.generate_example(T.example_seed(0, "train", 3), size=32)
    b = T.generate_example(T.example_seed(0, "train", 3), size=32)
    assert torch.equal(a.image, b.image) and torch.equal(a.target, b.target) and torch.equal(a.mask, b.mask)
    assert a.instruction == b.instruction and a.metadata == b.metadata
    c = T.generate_example(T.example_seed(0, "train", 4), size=32)
    assert not torch.equal(a.image, c.image)


def test_dataset_is_deterministic_and_balanced():
    d1 = T.MiniBenchDataset(12, split="train", seed=5)
    d2 = T.MiniBenchDataset(12, split="train", seed=5, cache=False)
    assert len(d1) == 12
    for i in range(12):
        assert torch.equal(d1[i].image, d2[i].image) and d1[i].instruction == d2[i].instruction
    assert [d1[i].task for i in range(6)] == ["add", "remove", "replace"] * 2
    pt = T.MiniBenchDataset(split="val", per_task=4, seed=1)
    assert [e.task for e in pt] == ["add"] * 4 + ["remove"] * 4 + ["replace"] * 4
    assert T.MiniBenchDataset(3, seed=6)[0].instruction != d1[0].instruction or \
        not torch.equal(T.MiniBenchDataset(3, seed=6)[0].image, d1[0].image)


def test_splits_never_share_seeds_or_images():
    seeds = {split: set() for split in T.SPLITS}
    for base in (0, 1, 7, 12345, 2**31 + 3):
        for split in T.SPLITS:
            seeds[split] |= set(T.MiniBenchDataset(300, split=split, seed=base).seeds)
            seeds[split] |= set(T.MiniBenchDataset(split=split, per_task=100, seed=base).seeds)
    for split in T.SPLITS:
        assert len(seeds[split]) == 5 * 600  # no collision inside a split either
        assert all(T.split_of_seed(s) == split and 0 <= s < 2**63 for s in seeds[split])
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"] and not seeds["val"] & seeds["test"]
    # disjoint by construction, whatever the base seed and index: the low bits name the split
    for base, index in [(0, 0), (3, 2**40), (2**62, 17), (99, 2**62 + 5)]:
        found = [T.example_seed(base, split, index, task) for split in T.SPLITS for task in (None, *T.TASKS)]
        assert [T.split_of_seed(s) for s in found] == [split for split in T.SPLITS for _ in range(4)]
    # and no val or test image equals a train image
    train_imgs = {T.MiniBenchDataset(150, split="train", seed=0)[i].image.numpy().tobytes() for i in range(150)}
    for split in ("val", "test"):
        held_ds = T.MiniBenchDataset(150, split=split, seed=0)
        assert not any(held_ds[i].image.numpy().tobytes() in train_imgs for i in range(150))
        assert held_ds[0].metadata["split"] == split


# Train seeds before the val/test split existed (the old formula, computed before the change): the tiny
# editor and the tiny CLIP were pretrained on these, so they are a contract.
OLD_TRAIN_SEEDS = {(0, 0, None): 1527915562432365366, (0, 1, None): 3148923519914866020,
                   (0, 511, None): 3830944987058334592, (7, 3, "add"): 7216220047699996230,
                   (3, 12, "replace"): 3361866992434414290}


def test_train_seeds_are_unchanged():
    for (base, index, task), seed in OLD_TRAIN_SEEDS.items():
        assert T.example_seed(base, "train", index, task) == seed
    ex = T.MiniBenchDataset(2, split="train", seed=0)[1]
    assert ex.metadata["seed"] == OLD_TRAIN_SEEDS[(0, 1, None)] and ex.metadata["split"] == "train"


def test_heldout_is_an_alias_of_val():
    assert T.canonical_split("heldout") == "val" and T.example_seed(4, "heldout", 9) == T.example_seed(4, "val", 9)
    old = T.MiniBenchDataset(3, split="heldout", seed=2)
    new = T.MiniBenchDataset(3, split="val", seed=2)
    assert old.split == "val" and old.seeds == new.seeds and old[0].example_id == "val-add-00000"
    assert old[0].metadata["split"] == "val" and torch.equal(old[0].image, new[0].image)
    test = T.MiniBenchDataset(3, split="test", seed=2)
    assert test[0].metadata["split"] == "test" and not set(test.seeds) & set(new.seeds)
    with pytest.raises(ValueError, match="split must be one of"):
        T.MiniBenchDataset(3, split="validation")


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("size", [32, 64])
def test_example_contract(task, size):
    for i in range(10):
        ex = T.generate_example(T.example_seed(2, "train", i, task), task=task, size=size)
        assert ex.task == task and ex.metadata["task"] == task
        assert ex.image.shape == (3, size, size) and ex.target.shape == (3, size, size)
        assert ex.image.dtype == torch.float32 and ex.mask.shape == (size, size)
        assert float(ex.image.min()) >= 0 and float(ex.image.max()) <= 1
        assert set(torch.unique(ex.mask).tolist()) <= {0.0, 1.0}
        m = ex.mask.bool()
        assert 0 < int(m.sum()) < size * size // 2
        # the edit happens inside the mask only, and it does happen
        diff = (ex.image - ex.target).abs().amax(0)
        assert float(diff[~m].max()) == 0.0
        assert float(diff[m].max()) > 0.2
        spec = ex.spec
        json.dumps(ex.metadata)  # JSON-serializable (CompBench metadata.json)
        top, left, bottom, right = spec["mask_box"]
        assert m[top:bottom, left:right].all() and int(m.sum()) == (bottom - top) * (right - left)
        words = set(ex.instruction.split()) | set(ex.caption.split())
        assert words <= set(T.VOCABULARY), words - set(T.VOCABULARY)
        if task == "add":
            assert spec["before"] is None and spec["after"]["color"] in ex.instruction
            assert ex.caption == T.object_caption(spec["after"]["color"], spec["after"]["shape"])
        elif task == "remove":
            assert spec["after"] is None and ex.caption.endswith("background")
            assert f'{spec["before"]["color"]} {spec["before"]["shape"]}' in ex.instruction
        else:
            b, a = spec["before"], spec["after"]
            assert (b["color"], b["shape"]) != (a["color"], a["shape"])
            assert f'{a["color"]} {a["shape"]}' in ex.instruction
        # the named object is unique among the source objects
        if spec["before"] is not None:
            same = [o for o in spec["objects"] if (o["color"], o["shape"]) == (spec["before"]["color"],
                                                                               spec["before"]["shape"])]
            assert len(same) == 1


def test_same_scene_at_two_sizes():
    s = T.example_seed(0, "heldout", 0)
    a, b = T.generate_example(s, size=32), T.generate_example(s, size=64)
    assert a.instruction == b.instruction and a.spec["objects"][0]["center"] == b.spec["objects"][0]["center"]
    down = torch.nn.functional.avg_pool2d(b.image[None], 2)[0]
    assert float((down - a.image).abs().mean()) < 0.03


def _as_edit_example():
    """The trainer's item reader (its module moved in the package restructure)."""
    import importlib

    for name in ("rcgrpo.train.data", "rcgrpo.train.trainer", "rcgrpo.trainer"):
        try:
            fn = getattr(importlib.import_module(name), "as_edit_example", None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    raise AssertionError("rcgrpo has no as_edit_example")


def test_trainer_reads_items():
    as_edit_example = _as_edit_example()
    ex = T.MiniBenchDataset(2, split="train", seed=0)[1]
    image, mask, instruction, example_id, metadata = as_edit_example(ex, 1)
    assert image.shape == ex.image.shape and mask.shape == ex.mask.shape and instruction == ex.instruction
    assert example_id == ex.example_id and metadata["minibench"]["task"] == ex.task
    image, mask, instruction, example_id, metadata = as_edit_example(ex.to_dict(), 1)
    assert example_id == ex.example_id


def test_shapes_are_distinct_and_bad_input_raises():
    covs = {s: T.shape_coverage(s, 16, 16, 10, 32, 32) for s in T.SHAPES}
    for s1 in T.SHAPES:
        assert 0.1 < covs[s1].mean() < 0.35, s1  # about a quarter of the image at r = 10 px
        for s2 in T.SHAPES:
            if s1 < s2:
                inter = np.minimum(covs[s1], covs[s2]).sum()
                union = np.maximum(covs[s1], covs[s2]).sum()
                assert inter / union < 0.85, (s1, s2)
    with pytest.raises(ValueError, match="task"):
        T.generate_example(1, task="move")
    with pytest.raises(ValueError, match="split"):
        T.example_seed(0, "validation", 0)
    with pytest.raises(ValueError, match="size"):
        T.generate_example(1, size=8)
    with pytest.raises(ValueError, match="shape"):
        T.shape_coverage("star", 1, 1, 1, 4, 4)
    with pytest.raises(ValueError, match="per_task"):
        T.MiniBenchDataset(3, per_task=2)
    with pytest.raises(ValueError, match="seed"):
        T.generate_example(-1)
    with pytest.raises(IndexError):
        T.MiniBenchDataset(2)[2]
