"""The policy update of one group (SPEC §5-6): anchor predictions under θ, the surrogate leaping
policy over the stored candidate states, the clipped objective, its backward.

For anchor k and train transition j:

    x̄^(k)_{j+1}(θ)   = x^(k)_j + (σ_{j+1} − σ_j) · v_θ(x^(k)_j, t_j, c)      (with grad)
    x̄^(k)_{j+1}(old) = x^(k)_{j+1}                                          (the stored state)
    log π(i | j, k)  = log_softmax_i(−½ d²_C(x^(i)_{j+1}, x̄^(k)_{j+1}))

Transitions are processed in chunks of `train_step_chunk` (one backward each), which bounds the
activation memory. Besides the loss, the update reports the surrogate's entropy and the probability
π_old puts on the anchor itself. After the optimizer step, `diagnostics` runs one no-grad forward per
anchor transition on the same batch and measures how far the update moved the policy. At MiniBench's D
the softmax over −½ d²_C is one-hot, so KL(π_old‖π_θ) and the entropy read ~0 whatever the update
does; what stays informative (all uniform over anchors, transitions and the G candidates):

    approx_kl       = ½ · mean (log ρ)²,  log ρ = clamp(log π_θ − log π_old, −10, 10)   (Flow-GRPO's)
    clip_frac_high  = fraction of ρ > 1 + ε_clip;   clip_frac_low = fraction of ρ < 1 − ε_clip
    leap (edit / background): Σ M_d (x̄_θ − x̄_old)² and its count B·|J|·|M| (resp. 1 − M), whose
                      ratio over all groups is the squared RMS of the anchor's one-step leap
"""
from __future__ import annotations

import torch

from ..method.policy import LOG_RATIO_CLAMP, grpo_loss, surrogate_log_probs
from .metrics import masked_square_sums


class SurrogateUpdate:
    def __init__(self, editor, config, phases, device, autocast):
        self.editor = editor  # `editor.velocity(conditioning, x, t)`: the family's v_θ with its guidance
        self.transformer = editor.transformer
        self.config = config
        self.phases = phases
        self.device = device
        self.autocast = autocast

    def _chunks(self, group, anchors: torch.Tensor):
        """Per chunk of train transitions: (x_j [B·c, N, C], t_j, dt, states_next [c, G, D], old_pred [c, B, D])."""
        cfg = self.config
        train_j = cfg.train_timestep_indices(group.sigmas.shape[0] - 1)
        dim = group.mask.shape[0]
        n_anchor = len(anchors)
        for c0 in range(0, len(train_j), cfg.train_step_chunk):
            chunk = torch.tensor(train_j[c0 : c0 + cfg.train_step_chunk])
            n_chunk = len(chunk)
            x_j = group.states[anchors][:, chunk].to(self.device)  # [B, c, N, C]
            x_j = x_j.reshape(n_anchor * n_chunk, *x_j.shape[2:])
            t_j = group.timesteps[chunk].repeat(n_anchor).to(self.device)
            sigma = group.sigmas[chunk].repeat(n_anchor).to(self.device)
            sigma_next = group.sigmas[chunk + 1].repeat(n_anchor).to(self.device)
            dt = (sigma_next - sigma).float()[:, None, None]
            states_next = group.states[:, chunk + 1].to(self.device).float().reshape(cfg.group_size, n_chunk, dim)
            states_next = states_next.transpose(0, 1).contiguous()  # [c, G, D]
            yield n_chunk / len(train_j), x_j, t_j, dt, states_next, states_next[:, anchors]

    def _anchor_prediction(self, group, x_j, t_j, dt, n_anchor: int) -> torch.Tensor:
        """x̄^(k)_{j+1}(θ) as `[c, B, D]` fp32."""
        v = self.editor.velocity(group.conditioning, x_j, t_j)
        pred = x_j.float() + dt * v.float()
        return pred.reshape(n_anchor, -1, group.mask.shape[0]).transpose(0, 1).contiguous()

    def _distance_kwargs(self) -> dict:
        cfg = self.config
        return dict(tau_edit=cfg.tau_edit, tau_base=cfg.tau_base, scale=cfg.distance_scale, eps=cfg.distance_eps,
                    backend=cfg.distance_backend)

    def backward(self, group, anchors: torch.Tensor, weight: float) -> dict:
        """Backward of `weight ×` the group's objective; returns its statistics (loss, ratios, entropy, ...)."""
        cfg = self.config
        kwargs = self._distance_kwargs()
        stats: dict[str, float] = {}
        for share, x_j, t_j, dt, states_next, old_pred in self._chunks(group, anchors):
            with self.phases("anchor_forward"), self.autocast():
                pred = self._anchor_prediction(group, x_j, t_j, dt, len(anchors))
            with self.phases("distances"):
                anchor_in = self.phases.wrap_inputs(pred, "distances")
                log_probs = self.phases.wrap_outputs(
                    surrogate_log_probs(states_next, anchor_in, group.mask, **kwargs), "distances")
                with torch.no_grad():
                    old_log_probs = surrogate_log_probs(states_next, old_pred, group.mask, **kwargs)
            ref_pred = None
            if cfg.beta > 0:
                with torch.no_grad(), self.autocast():
                    self.transformer.disable_adapters()
                    try:
                        ref_pred = self._anchor_prediction(group, x_j, t_j, dt, len(anchors))
                    finally:
                        self.transformer.enable_adapters()
            loss, loss_stats = grpo_loss(log_probs, old_log_probs, group.advantages.to(self.device),
                                         clip_eps=cfg.clip_eps, beta=cfg.beta, anchor_pred=pred, anchor_ref=ref_pred,
                                         return_stats=True)
            (loss * share * weight).backward()
            parts = dict(vars(loss_stats), loss=float(loss.detach()), **_policy_shape(old_log_probs, anchors))
            for key, value in parts.items():
                if key in ("ratio_max", "ratio_min"):
                    pick = max if key == "ratio_max" else min
                    stats[key] = pick(stats[key], value) if key in stats else value
                else:
                    stats[key] = stats.get(key, 0.0) + value * share
        return stats

    @torch.no_grad()
    def diagnostics(self, group, anchors: torch.Tensor) -> dict:
        """The policy's movement on this group under the current weights (see the module docstring), from
        one forward per anchor transition: `policy_kl` (KL(π_old‖π_θ), exact over the G candidates),
        `approx_kl`, `clip_frac_high`, `clip_frac_low` (means over anchors and train transitions) and the
        leap's sums `leap_sq_edit`, `leap_n_edit`, `leap_sq_background`, `leap_n_background`."""
        kwargs = self._distance_kwargs()
        clip_eps = self.config.clip_eps
        out = dict.fromkeys(("policy_kl", "approx_kl", "clip_frac_high", "clip_frac_low", "leap_sq_edit",
                             "leap_n_edit", "leap_sq_background", "leap_n_background"), 0.0)
        for share, x_j, t_j, dt, states_next, old_pred in self._chunks(group, anchors):
            with self.autocast():
                pred = self._anchor_prediction(group, x_j, t_j, dt, len(anchors))
            new = surrogate_log_probs(states_next, pred, group.mask, **kwargs)
            old = surrogate_log_probs(states_next, old_pred, group.mask, **kwargs)
            out["policy_kl"] += float((old.exp() * (old - new)).sum(-1).mean()) * share
            log_ratio = (new - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            ratio = log_ratio.exp()
            out["approx_kl"] += 0.5 * float(log_ratio.square().mean()) * share
            out["clip_frac_high"] += float((ratio > 1.0 + clip_eps).float().mean()) * share
            out["clip_frac_low"] += float((ratio < 1.0 - clip_eps).float().mean()) * share
            for key, value in masked_square_sums(pred - old_pred.float(), group.mask, "leap").items():
                out[key] += value
        return out


def _policy_shape(old_log_probs: torch.Tensor, anchors: torch.Tensor) -> dict:
    """Entropy of π_old over the candidates and the probability π_old gives the anchor itself (means over
    transitions and anchors); a one-hot policy has entropy 0 and π_old(anchor) = 1."""
    p = old_log_probs.exp()
    entropy = -(p * old_log_probs.clamp_min(-1e30)).sum(-1)
    idx = anchors.to(old_log_probs.device)[None, :, None].expand(old_log_probs.shape[0], -1, 1)
    on_anchor = p.gather(-1, idx)
    return {"policy_entropy": float(entropy.mean()), "pi_old_anchor": float(on_anchor.mean())}


__all__ = ["SurrogateUpdate"]
