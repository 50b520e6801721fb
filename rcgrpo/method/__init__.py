"""The paper's formulas (SPEC §2-7), one module each, free of diffusers and of the trainer:

- `masks`: pixel → token → element edit masks (§2);
- `rdp`: Region-Decoupled Perturbation (§3);
- `policy`: region-normalized distance, surrogate log-probs, clipped GRPO objective (§5-6);
- `advantages`: reward standardization and group advantages (§6);
- `acd`: Attention Concentration Density from attention mass (§7).
"""
from .acd import acd_from_mass, acd_reward
from .advantages import combine_rewards, group_advantages, standardize
from .masks import element_mask, pixel_to_token_mask, token_grid, token_mask_for_image
from .policy import distance_from_region_sums, grpo_loss, region_normalized_distance, surrogate_log_probs
from .rdp import perturbation_scale, region_decoupled_noise

__all__ = [
    "acd_from_mass",
    "acd_reward",
    "combine_rewards",
    "distance_from_region_sums",
    "element_mask",
    "group_advantages",
    "grpo_loss",
    "perturbation_scale",
    "pixel_to_token_mask",
    "region_decoupled_noise",
    "region_normalized_distance",
    "standardize",
    "surrogate_log_probs",
    "token_grid",
    "token_mask_for_image",
]
