"""Training data: dataset items as edit examples, fixed-size resizing, the datasets a config names."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def as_edit_example(item, index: int):
    """(image [3,H,W], mask [H,W], instruction, example_id, metadata) from a dataset item.

    Accepts objects with `image`, `mask`, `instruction` attributes (e.g. `rcgrpo.data.synthetic.EditExample`,
    CompBench examples) or dicts with those keys.
    """
    get = (lambda k, d=None: item.get(k, d)) if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
    image, mask, instruction = get("image"), get("mask"), get("instruction")
    if image is None or mask is None or instruction is None:
        raise ValueError(f"dataset item {index} must provide image, mask and instruction")
    if callable(image):
        image = image()
    if callable(mask):
        mask = mask()
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"dataset item {index}: image must be a [3, H, W] tensor in [0, 1]")
    example_id = str(get("example_id", None) or get("id", None) or f"example-{index}")
    return image.float(), torch.as_tensor(mask).float(), str(instruction), example_id, dict(get("metadata", None) or {})


def resize_example(image: torch.Tensor, mask: torch.Tensor, size):
    """Image `[3, H, W]` (bicubic, antialiased, clamped) and mask `[H, W]` (nearest) resized to `size`
    (an int for a square, or `(height, width)`)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    image = F.interpolate(image[None], size=hw, mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
    mask = F.interpolate(mask[None, None].float(), size=hw, mode="nearest")[0, 0]
    return image, mask


def example_at_resolution(item, index: int, size: int, *, edit_size=None, keep_aspect: bool = False):
    """`as_edit_example` resized for an edit at about `size`² pixels: `size`×`size`, or with
    `keep_aspect` the size `edit_size(height, width, size)` gives (an editor's `edit_size`: its family's
    buckets, the aspect ratio kept)."""
    image, mask, instruction, example_id, metadata = as_edit_example(item, index)
    height, width = image.shape[1:]
    if keep_aspect:
        if edit_size is None:
            raise ValueError("example_at_resolution: keep_aspect needs the editor's edit_size")
        target = tuple(edit_size(height, width, size))
    else:
        target = (size, size)
    if (height, width) != target:
        image, mask = resize_example(image, mask, target)
    return image, mask, instruction, example_id, metadata


class Subset:
    """The items of `data` at `indices`, as a list-like dataset."""

    def __init__(self, data, indices):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


_DATASETS: dict = {}


def register_dataset(name: str, build) -> None:
    """Make `config.dataset == name` build `build(config) -> (train, held_out)`; MiniBench registers
    "minibench" when imported."""
    if not name or "/" in name or not callable(build):
        raise ValueError(f"register_dataset: expected a plain name and a callable, got {name!r}")
    _DATASETS[name] = build


def build_datasets(config):
    """(train, held-out) datasets of `config.dataset`: the built-in "squares" task, MiniBench ("minibench":
    `train_size` examples of its train split drawn with `seed`, the first `eval_size` of its fixed
    `eval_split` split, val or test; the splits never share an example seed), or
    a CompBench directory whose first `eval_size` examples are held out."""
    if config.dataset == "squares":
        from ..data.synthetic import SquareDataset

        train = SquareDataset(config.train_size, size=config.resolution, seed=config.seed)
        held_out = SquareDataset(config.eval_size, size=config.resolution, seed=10_000 + config.seed)
        return train, held_out
    if config.dataset in _DATASETS:
        return _DATASETS[config.dataset](config)
    if config.dataset == "minibench":
        raise ValueError("dataset 'minibench' registers itself when rcgrpo.minibench is imported (the rcgrpo "
                         "command does it)")
    from ..eval.compbench import CompBenchDataset

    data = CompBenchDataset(config.dataset, resolution=config.resolution, require_ground_truth=False)
    n_eval = min(config.eval_size, max(len(data) - 1, 0))
    return Subset(data, range(n_eval, len(data))), Subset(data, range(n_eval))


__all__ = ["Subset", "as_edit_example", "build_datasets", "example_at_resolution", "register_dataset", "resize_example"]
