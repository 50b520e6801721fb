"""rcgrpo: region-constrained GRPO post-training for flow-based image editors (FLUX.1-Kontext, Qwen-Image-Edit).

Layout (see ARCHITECTURE.md):
- `rcgrpo.method`: the paper's formulas (masks, RDP, surrogate policy, advantages, ACD);
- `rcgrpo.editors`: the editor families behind one interface (loading, rollouts, the ACD processors);
- `rcgrpo.train`: config, trainer, checkpoints, phases, reports;
- `rcgrpo.rewards`: reward functions, the EditScore client and its server;
- `rcgrpo.eval`: CompBench evaluation; `rcgrpo.dryrun`: full-size dry runs;
- `rcgrpo.data`, `rcgrpo.io`, `rcgrpo.cli`, `rcgrpo.testing` (tiny offline pipelines).

The names below are the public API; each imports on first use (so `rcgrpo --help` imports no torch).
"""
__version__ = "0.1.0"

_LAZY = {
    "acd_from_mass": "rcgrpo.method.acd",
    "acd_reward": "rcgrpo.method.acd",
    "combine_rewards": "rcgrpo.method.advantages",
    "group_advantages": "rcgrpo.method.advantages",
    "standardize": "rcgrpo.method.advantages",
    "element_mask": "rcgrpo.method.masks",
    "pixel_to_token_mask": "rcgrpo.method.masks",
    "token_mask_for_image": "rcgrpo.method.masks",
    "distance_from_region_sums": "rcgrpo.method.policy",
    "grpo_loss": "rcgrpo.method.policy",
    "region_normalized_distance": "rcgrpo.method.policy",
    "surrogate_log_probs": "rcgrpo.method.policy",
    "region_decoupled_noise": "rcgrpo.method.rdp",
    "Editor": "rcgrpo.editors.base",
    "RolloutResult": "rcgrpo.editors.base",
    "load_editor": "rcgrpo.editors.loading",
    "editor_for_pipeline": "rcgrpo.editors.loading",
    "rollout": "rcgrpo.editors.functional",
    "FluxACDAttnProcessor": "rcgrpo.editors.flux_kontext.attention",
    "QwenACDAttnProcessor": "rcgrpo.editors.qwen_image_edit.attention",
    "attach_acd": "rcgrpo.editors.acd",
    "detach_acd": "rcgrpo.editors.acd",
    "ACDRecorder": "rcgrpo.editors.acd",
    "save_acd_heatmap": "rcgrpo.editors.heatmap",
    "RCGRPOConfig": "rcgrpo.train.config",
    "RCGRPOTrainer": "rcgrpo.train.trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rcgrpo' has no attribute {name!r}")


__all__ = list(_LAZY)


def __dir__():
    return sorted(list(globals()) + __all__)
