"""Each formula of SPEC §2-7 against an independent computation written here."""
import math

import pytest
import torch

import rcgrpo
from rcgrpo.method import advantages
from rcgrpo.method.advantages import combine_rewards, group_advantages, standardize
from rcgrpo.method.masks import element_mask, pixel_to_token_mask, token_mask_for_image
from rcgrpo.method.policy import grpo_loss, region_normalized_distance, surrogate_log_probs
from rcgrpo.method.rdp import region_decoupled_noise


# ---------------------------------------------------------------- masks (§2)
def test_pixel_to_token_mask_max_and_mean_pooling():
    pixel = torch.zeros(8, 8)
    pixel[0, 0] = 1.0  # one pixel of token (0, 0)
    pixel[4:8, 4:8] = 1.0  # all of token (1, 1)
    m_max = pixel_to_token_mask(pixel, (2, 2), pooling="max")
    assert m_max.tolist() == [1.0, 0.0, 0.0, 1.0]
    m_mean = pixel_to_token_mask(pixel, (2, 2), pooling="mean", threshold=0.5)
    assert m_mean.tolist() == [0.0, 0.0, 0.0, 1.0]


def test_element_mask_repeats_token_mask_over_channels():
    m = torch.tensor([0.0, 1.0, 0.5])
    M = element_mask(m, 2)
    assert M.tolist() == [0.0, 0.0, 1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("fill, problem", [(0.0, "no token"), (1.0, "covers every token")])
def test_empty_or_full_mask_rejected(fill, problem):
    with pytest.raises(ValueError, match=problem) as err:
        token_mask_for_image(torch.full((32, 32), fill), 32, 32, 2, name="example-7")
    assert "example-7" in str(err.value)


def test_mask_size_must_match_image():
    with pytest.raises(ValueError, match="does not match the image size"):
        token_mask_for_image(torch.ones(16, 32), 32, 32, 2)


# ---------------------------------------------------------------- RDP (§3)
def _mask_2d(n_tok=64, channels=16, n_edit=16):
    m = torch.zeros(n_tok)
    m[:n_edit] = 1.0
    return m[:, None].expand(n_tok, channels)


def test_rdp_reference_is_eps_star_and_seeded():
    mask = _mask_2d()
    a = region_decoupled_noise((64, 16), mask, group_size=5, generator=torch.Generator().manual_seed(3))
    b = region_decoupled_noise((64, 16), mask, group_size=5, generator=torch.Generator().manual_seed(3))
    eps_star = torch.randn((64, 16), generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, 64, 16)
    torch.testing.assert_close(a[0], eps_star, rtol=0, atol=0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rdp_formula_independent():
    mask = _mask_2d()
    gen = torch.Generator().manual_seed(11)
    noises = region_decoupled_noise((64, 16), mask, group_size=3, alpha_edit=0.4, alpha_base=0.05, generator=gen)
    gen = torch.Generator().manual_seed(11)
    eps = torch.randn((64, 16), generator=gen)
    deltas = torch.randn((2, 64, 16), generator=gen)
    alpha = torch.where(mask > 0, torch.tensor(0.4), torch.tensor(0.05))
    expect = (1 - alpha**2).sqrt() * eps + alpha * deltas
    torch.testing.assert_close(noises[1:], expect)


def test_rdp_marginal_is_standard_normal():
    # With α_edit = 0.9 dropping sqrt(1 − α²) would give variance 1 + 0.81: the test would fail.
    n = 200_000
    mask = torch.ones(n)
    mask[: n // 2] = 0.0
    noises = region_decoupled_noise((n,), mask, group_size=3, alpha_edit=0.9, alpha_base=0.5,
                                    generator=torch.Generator().manual_seed(0))
    for cand in noises[1:]:
        for region in (cand[: n // 2], cand[n // 2 :]):
            assert abs(float(region.mean())) < 0.02
            assert abs(float(region.var()) - 1.0) < 0.03


def test_rdp_background_stays_within_alpha_base_of_reference():
    mask = _mask_2d()
    noises = region_decoupled_noise((64, 16), mask, group_size=8, alpha_edit=0.3, alpha_base=0.02,
                                    generator=torch.Generator().manual_seed(1))
    diff = noises[1:] - noises[0]
    bg, edit = diff[:, mask == 0], diff[:, mask == 1]
    # E|Δ|² in the background ≈ 2(1 − sqrt(1−α²)) + α² ≈ α² for small α, so RMS ≈ α_base.
    assert float(bg.square().mean().sqrt()) < 0.02 * 1.5
    assert float(edit.square().mean().sqrt()) > 0.3 * 0.8


def test_rdp_global_perturbation_when_alphas_equal():
    mask = _mask_2d()
    noises = region_decoupled_noise((64, 16), mask, group_size=4, alpha_edit=0.3, alpha_base=0.3,
                                    generator=torch.Generator().manual_seed(2))
    diff = noises[1:] - noises[0]
    ratio = diff[:, mask == 0].square().mean() / diff[:, mask == 1].square().mean()
    assert 0.8 < float(ratio) < 1.25


def test_rdp_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        region_decoupled_noise((4, 2), torch.ones(4, 2), group_size=1)


# ---------------------------------------------------------------- distance (§5)
def test_distance_equals_squared_euclidean_for_unit_taus_and_uniform_deviation():
    torch.manual_seed(0)
    T, G, K, D = 2, 5, 3, 600
    mask = (torch.rand(D) < 0.3).float()
    x = torch.randn(T, G, D)
    y = torch.randn(T, K, D)
    # Uniform deviation: every element of x_i − y_k has the same magnitude c_{ik}, so the
    # per-element mean is the same in both regions and the normalization cancels.
    signs = torch.randint(0, 2, (T, K, G, D)).float() * 2 - 1
    c = torch.rand(T, K, G, 1) + 0.5
    for k in range(K):
        x_k = y[:, k : k + 1] + c[:, k] * signs[:, k]
        d2 = region_normalized_distance(x_k, y[:, k : k + 1], mask, tau_edit=1.0, tau_base=1.0,
                                        eps=0.0, backend="torch")
        plain = (x_k - y[:, k : k + 1]).square().sum(-1)
        torch.testing.assert_close(d2[:, 0], plain, rtol=1e-5, atol=1e-4)


def test_distance_formula_independent():
    torch.manual_seed(1)
    T, G, K, D = 3, 4, 2, 257
    mask = torch.rand(D)
    x, y = torch.randn(T, G, D, dtype=torch.float64), torch.randn(T, K, D, dtype=torch.float64)
    tau_e, tau_b, s, eps = 0.9, 1.1, 0.7, 1e-6
    d2 = region_normalized_distance(x, y, mask.double(), tau_edit=tau_e, tau_base=tau_b, scale=s, backend="torch")
    for t in range(T):
        for k in range(K):
            for i in range(G):
                diff2 = (x[t, i] - y[t, k]) ** 2
                Mabs = float(mask.double().sum())
                expect = s * (D / 2) * (
                    float((mask.double() * diff2).sum()) / (tau_e**2 * (Mabs + eps))
                    + float(((1 - mask.double()) * diff2).sum()) / (tau_b**2 * (D - Mabs + eps))
                )
                assert math.isclose(float(d2[t, k, i]), expect, rel_tol=1e-10)


def test_surrogate_log_probs_is_log_softmax_over_candidates():
    torch.manual_seed(2)
    x, y = torch.randn(2, 4, 64), torch.randn(2, 3, 64)
    mask = (torch.arange(64) < 20).float()
    lp = surrogate_log_probs(x, y, mask, backend="torch")
    assert lp.shape == (2, 3, 4)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(2, 3))
    d2 = region_normalized_distance(x, y, mask, backend="torch")
    torch.testing.assert_close(lp[0, 1, 2] - lp[0, 1, 0], -0.5 * (d2[0, 1, 2] - d2[0, 1, 0]))


# ---------------------------------------------------------------- loss (§6)
def test_loss_at_theta_old_is_minus_mean_advantage_and_ratio_one():
    torch.manual_seed(3)
    lp = torch.log_softmax(torch.randn(2, 3, 5), -1)
    adv = torch.randn(5)
    loss, stats = grpo_loss(lp.clone().requires_grad_(), lp, adv, return_stats=True)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats.ratio_mean == pytest.approx(1.0) and stats.clip_fraction == 0.0


def test_loss_clipping_matches_ppo_formula():
    lp_old = torch.log(torch.tensor([[[0.5, 0.5]]]))
    lp_new = torch.log(torch.tensor([[[0.8, 0.2]]]))
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(lp_new, lp_old, adv, clip_eps=0.2, return_stats=True)
    ratio = torch.tensor([1.6, 0.4])
    expect = -torch.minimum(adv * ratio, adv * ratio.clamp(0.8, 1.2)).mean()
    torch.testing.assert_close(loss, expect)
    assert stats.clip_fraction == 1.0


def test_beta_term_adds_mean_squared_deviation():
    lp = torch.zeros(1, 1, 2)
    pred, ref = torch.ones(1, 1, 4), torch.zeros(1, 1, 4)
    loss = grpo_loss(lp, lp, torch.zeros(2), beta=0.5, anchor_pred=pred, anchor_ref=ref)
    torch.testing.assert_close(loss, torch.tensor(0.5))


def test_gradient_moves_anchor_toward_high_advantage_candidate():
    # Two candidates at ±1 on a line, the anchor at 0: candidate 1 has the positive advantage.
    D = 4
    states = torch.stack([torch.full((D,), -1.0), torch.full((D,), 1.0)])[None]  # [T=1, G=2, D]
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])
    anchor = torch.zeros(1, 1, D, requires_grad=True)
    lp = surrogate_log_probs(states, anchor, mask, backend="torch")
    old = lp.detach()
    loss = grpo_loss(lp, old, torch.tensor([-1.0, 1.0]))
    loss.backward()
    step = -anchor.grad[0, 0]  # gradient descent direction
    assert bool((step > 0).all()), "the anchor must move toward the +1 candidate in every coordinate"


# ---------------------------------------------------------------- advantages (§6)
def test_group_advantages_independent():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 3)
    g = r[:3]
    expect = (g - g.mean()) / (g.std(correction=0) + 1e-8)
    torch.testing.assert_close(adv[:3], expect)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # zero-variance group: 0, never NaN


def test_quasi_norm_advantages():
    r = torch.tensor([0.0, 1.0, 3.0])
    adv = group_advantages(r, 3, mode="quasi_norm", p=0.8)
    c = r - r.mean()
    torch.testing.assert_close(adv, c / (c.abs().pow(0.8).mean().pow(1 / 0.8) + 1e-8))


def test_reward_standardization_and_combination():
    task = torch.tensor([1.0, 2.0, 3.0, 4.0])
    acd = torch.tensor([2.0, 2.0, 1.0, 3.0])
    z = lambda v: (v - v.mean()) / (v.std(correction=0) + 1e-8)  # noqa: E731
    torch.testing.assert_close(standardize(task), z(task))
    torch.testing.assert_close(combine_rewards(task, acd, w_task=1.0, w_acd=0.5), z(task) + 0.5 * z(acd))
    torch.testing.assert_close(combine_rewards(task, acd, w_acd=0.0), z(task))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reward_rejected(bad):
    with pytest.raises(ValueError, match="NaN or inf at positions \\[1\\]"):
        group_advantages(torch.tensor([0.0, bad, 1.0, 2.0]), 2)


def test_group_size_checks():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(torch.zeros(5), 2)


# ---------------------------------------------------------------- ACD (§7)
def test_acd_is_one_for_uniform_mass_and_grows_with_concentration():
    m = torch.zeros(10)
    m[:3] = 1
    uniform = torch.full((1, 10), 0.7)
    assert float(rcgrpo.acd_from_mass(uniform, m)) == pytest.approx(1.0, abs=1e-5)
    concentrated = torch.ones(1, 10) * 0.1
    concentrated[0, :3] = 1.0
    acd = float(rcgrpo.acd_from_mass(concentrated, m))
    expect = (3.0 / 3) / (3.7 / 10)
    assert acd == pytest.approx(expect, rel=1e-5) and acd > 1


def test_acd_reward_is_mean_over_calls():
    per_call = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    torch.testing.assert_close(rcgrpo.acd_reward(per_call), torch.tensor([2.0, 3.0]))


def test_group_advantages_accept_groups_by_rows():
    r = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_advantages(r, 3), group_advantages(r.reshape(-1), 3).view(2, 3))


def test_low_variance_groups_and_global_std_formulas():
    rewards = torch.tensor([0.0, 1.0, 2.0, 3.0, 5.0, 5.0, 5.001, 5.0])
    assert advantages.low_variance_groups(rewards, 4, 0.01).tolist() == [False, True]
    assert advantages.low_variance_groups(rewards, 4, 0.0).tolist() == [False, False]
    sq, n = advantages.centered_square_sum(rewards, 4)
    centered = torch.cat([rewards[:4] - 1.5, rewards[4:] - 5.00025])
    assert n == 8 and sq == pytest.approx(float(centered.double().square().sum()), rel=1e-6)
    adv = advantages.global_std_advantages(rewards, 4, math.sqrt(sq / n))
    torch.testing.assert_close(adv, centered / math.sqrt(sq / n), rtol=1e-5, atol=1e-6)
    assert adv[4:].abs().max() < 0.01 < adv[:4].abs().max()  # the near-constant group keeps tiny advantages
    assert torch.equal(advantages.global_std_advantages(torch.ones(8), 4, 0.0), torch.zeros(8))
    with pytest.raises(ValueError, match="do not split"):
        advantages.global_std_advantages(torch.ones(6), 4, 1.0)


def test_step_advantages_filter_and_global_std():
    combined = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 1.0, 0.0, 0.0])
    task = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5])  # the second group's task reward is constant
    calls = []

    def reduce_sum(t):
        calls.append(t.clone())
        return t

    adv, keep = advantages.step_advantages(combined, task, 4, std="global", low_variance_threshold=1e-3,
                                           reduce_sum=reduce_sum)
    assert keep.tolist() == [True, False] and torch.equal(adv[4:], torch.zeros(4))
    s = math.sqrt(5.0 / 4)  # only the kept group: centered (−1.5, −0.5, 0.5, 1.5)
    torch.testing.assert_close(adv[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / s)
    assert len(calls) == 1 and calls[0].tolist() == [5.0, 4.0]
    group, keep_all = advantages.step_advantages(combined, task, 4)
    assert keep_all.all() and torch.equal(group, group_advantages(combined, 4))
    empty, _ = advantages.step_advantages(torch.zeros(0), torch.zeros(0), 4, std="global", reduce_sum=reduce_sum)
    assert empty.numel() == 0 and len(calls) == 2  # a rank without groups still joins the reduction
