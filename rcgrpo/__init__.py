"""rcgrpo: region-constrained GRPO post-training for flow-based image editors (FLUX.1-Kontext).

Layout (see ARCHITECTURE.md):
- `rcgrpo.method`: the paper's formulas (masks, RDP, surrogate policy, advantages, ACD);
- `rcgrpo.flux`: the diffusers integration (pipeline loading, rollouts, the ACD attention processor);
- `rcgrpo.train`: config, trainer, checkpoints, phases, reports;
- `rcgrpo.rewards`: reward functions, the EditScore client and its server;
- `rcgrpo.eval`: CompBench evaluation; `rcgrpo.dryrun`: full-size dry runs;
- `rcgrpo.data`, `rcgrpo.io`, `rcgrpo.cli`, `rcgrpo.testing` (tiny offline pipelines).

The names below are the public API; the method's names import eagerly, the rest on first use.
"""
from .method.acd import acd_from_mass, acd_reward
from .method.advantages import combine_rewards, group_advantages, standardize
from .method.masks import element_mask, pixel_to_token_mask, token_mask_for_image
from .method.policy import distance_from_region_sums, grpo_loss, region_normalized_distance, surrogate_log_probs
from .method.rdp import region_decoupled_noise

__version__ = "0.1.0"

_LAZY = {
    "RolloutResult": "rcgrpo.flux.rollout",
    "rollout": "rcgrpo.flux.rollout",
    "FluxACDAttnProcessor": "rcgrpo.flux.attention",
    "attach_acd": "rcgrpo.flux.attention",
    "detach_acd": "rcgrpo.flux.attention",
    "ACDRecorder": "rcgrpo.flux.attention",
    "save_acd_heatmap": "rcgrpo.flux.heatmap",
    "RCGRPOConfig": "rcgrpo.train.config",
    "RCGRPOTrainer": "rcgrpo.train.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rcgrpo' has no attribute {name!r}")


__all__ = [
    "acd_from_mass",
    "acd_reward",
    "combine_rewards",
    "distance_from_region_sums",
    "element_mask",
    "group_advantages",
    "grpo_loss",
    "pixel_to_token_mask",
    "region_decoupled_noise",
    "region_normalized_distance",
    "standardize",
    "surrogate_log_probs",
    "token_mask_for_image",
    *_LAZY,
]
