"""rcgrpo: region-constrained GRPO post-training for flow-based image editors (FLUX.1-Kontext).

The method (SPEC.md), one module per part:
- `rcgrpo.masks`: pixel → token → element edit masks.
- `rcgrpo.rdp`: Region-Decoupled Perturbation, `region_decoupled_noise`.
- `rcgrpo.rollout`: deterministic Euler rollouts of a stock FluxKontextPipeline.
- `rcgrpo.policy`: region-normalized distance, surrogate log-probs, clipped GRPO loss.
- `rcgrpo.advantages`: reward standardization, group advantages.
- `rcgrpo.acd`: Attention Concentration Density from attention mass.
"""
from .acd import acd_from_mass, acd_reward
from .advantages import combine_rewards, group_advantages, standardize
from .masks import element_mask, pixel_to_token_mask, token_mask_for_image
from .policy import distance_from_region_sums, grpo_loss, region_normalized_distance, surrogate_log_probs
from .rdp import region_decoupled_noise
from .rollout import RolloutResult, rollout

__version__ = "0.1.0"

_LAZY = {
    "FluxACDAttnProcessor": "rcgrpo.attention",
    "attach_acd": "rcgrpo.attention",
    "detach_acd": "rcgrpo.attention",
    "ACDRecorder": "rcgrpo.attention",
    "save_acd_heatmap": "rcgrpo.attention",
    "RCGRPOConfig": "rcgrpo.config",
    "RCGRPOTrainer": "rcgrpo.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rcgrpo' has no attribute {name!r}")


__all__ = [
    "RolloutResult",
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
    "rollout",
    "standardize",
    "surrogate_log_probs",
    "token_mask_for_image",
    *_LAZY,
]
