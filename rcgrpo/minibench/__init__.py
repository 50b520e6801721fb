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


def _datasets(config):
    """(train, held-out) of `dataset: minibench`: `train_size` examples of the train split drawn with the
    config's seed, the first `eval_size` of its `eval_split` (val or test); the splits never share a seed."""
    train = MiniBenchDataset(config.train_size, split="train", seed=config.seed, size=config.resolution)
    held_out = MiniBenchDataset(config.eval_size, split=config.eval_split, seed=0, size=config.resolution) \
        if config.eval_size else []
    return train, held_out


def _register() -> None:
    """MiniBench's names in the core's registries: `--model tiny-editor`, `dataset: minibench`,
    `reward_funcs: [minibench]` (the core never imports this package; the command line does)."""
    from ..editors.loading import register_model
    from ..rewards.registry import register_reward
    from ..train.data import register_dataset
    from .editor import shipped_tiny_editor, tiny_editor_defaults

    register_model("tiny-editor", shipped_tiny_editor, tiny_editor_defaults(), "FluxKontextPipeline",
                   "the pretrained tiny MiniBench editor (64 px Kontext architecture)")
    register_dataset("minibench", _datasets)
    register_reward("minibench", minibench_reward)


_register()

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
