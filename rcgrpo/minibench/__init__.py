"""MiniBench: an offline miniature of CompBench's local editing tasks (add / remove / replace) and the
tools around it.

- `rcgrpo.minibench.tasks`: the procedural task generator (`generate_example`, `MiniBenchDataset`,
  `example_seed`), deterministic in a seed, with disjoint train / val / test seed streams ("heldout"
  is an alias of "val").
- `rcgrpo.minibench.reward`: `minibench_reward`, the programmatic task reward (EditScore's role here).
- `rcgrpo.minibench.editor`: the tiny Kontext editor's components (tokenizers, model configs, loading);
  the shipped weights are under `weights/tiny-editor/` (`rcgrpo.testing.tiny_editor()`, `TINY_EDITOR_PATH`).
- `rcgrpo.minibench.pretrain`: `PretrainConfig`, `run_pretrain` — trains the tiny editor's VAE and
  transformer by flow matching on generated pairs (`rcgrpo pretrain-tiny`).
"""
from .tasks import (
    BACKGROUNDS,
    COLORS,
    DEFAULT_SIZE,
    MASK_MARGIN,
    SHAPES,
    SPLITS,
    TASKS,
    VOCABULARY,
    MiniBenchDataset,
    MiniBenchExample,
    background_caption,
    canonical_split,
    example_seed,
    generate_example,
    object_caption,
    shape_coverage,
    split_of_seed,
)
from .reward import minibench_reward, minibench_reward_terms

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DEFAULT_SIZE",
    "MASK_MARGIN",
    "SHAPES",
    "SPLITS",
    "TASKS",
    "VOCABULARY",
    "MiniBenchDataset",
    "MiniBenchExample",
    "background_caption",
    "canonical_split",
    "example_seed",
    "generate_example",
    "object_caption",
    "shape_coverage",
    "split_of_seed",
    "minibench_reward",
    "minibench_reward_terms",
]
