"""Triton backend of `region_sq_dists`: forward, backward, autograd through the public op.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) at small shapes with the
interpreter's fixed blocks (every GPU block configuration runs in test_kernel_configs.py); the GPU
tests run the target shape T=28, K=4, G=12, D=262144 in bf16. There is no determinism test: the
kernels use no atomics (each output is written by one program, partials are summed by torch), so
run-to-run equality holds by construction and a test of it could not fail.
"""
import pytest
import torch

from conftest import requires_backend, requires_cuda
from rcgrpo_kernels import region_sq_dists
from rcgrpo_kernels.region_sq_dists import region_sq_dists_bwd_torch, region_sq_dists_fwd_torch

pytestmark = requires_backend("triton")

LOWP = (torch.float32, torch.float16, torch.bfloat16)
# (T, G, K, D): odd D with a tail, single elements, candidate/anchor counts that need padding and
# more than one candidate block (G=13) or anchor block (K=9).
SHAPES = [(2, 3, 1, 1000), (1, 1, 1, 1), (2, 13, 5, 300), (1, 4, 9, 200)]


def _triton():
    from rcgrpo_kernels.triton_region_sq_dists import region_sq_dists_bwd_triton, region_sq_dists_fwd_triton

    return region_sq_dists_fwd_triton, region_sq_dists_bwd_triton


def _inputs(shape, dtype, mask_kind, device, seed=0):
    steps, group, anchors, dim = shape
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(steps, 1, dim, generator=gen)
    x = (base + 0.3 * torch.randn(steps, group, dim, generator=gen)).to(dtype)
    y = (base + 0.3 * torch.randn(steps, anchors, dim, generator=gen)).to(dtype)
    if mask_kind == "soft":
        mask = torch.rand(dim, generator=gen)
    else:
        mask = (torch.rand(dim, generator=gen) < 0.4).float()
    return x.to(device), y.to(device), mask.to(device)


def _sq_dists_dense(x, y, mask):
    """Independent broadcast formula in the inputs' dtype: [T, K, G, 2] (test sizes only)."""
    sq = (x[:, None] - y[:, :, None]) ** 2  # [T, K, G, D]
    m = mask.to(x.dtype)
    return torch.stack(((sq * m).sum(-1), (sq * (1 - m)).sum(-1)), dim=-1)


def _assert_flash_rule(out, ref, baseline, floor_rel=1e-5, what=""):
    """Error of `out` vs the high-precision `ref` <= 2x the error of `baseline` (torch in the same
    dtype) plus a floor relative to the reference's magnitude."""
    ref = ref.double()
    err = (out.double() - ref).abs().max().item()
    base = (baseline.double() - ref).abs().max().item()
    floor = floor_rel * max(ref.abs().max().item(), 1e-12)
    assert err <= 2 * base + floor, f"{what}: error {err:.3e} > 2 * torch error {base:.3e} + {floor:.3e}"


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["soft", "hard"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_dense_formula(shape, dtype, mask_kind, device):
    fwd, _ = _triton()
    x, y, mask = _inputs(shape, dtype, mask_kind, device)
    out = fwd(x, y, mask)
    steps, group, anchors, _ = shape
    assert out.shape == (steps, anchors, group, 2) and out.dtype == torch.float32 and out.is_contiguous()
    ref = _sq_dists_dense(x.double(), y.double(), mask.double())
    _assert_flash_rule(out, ref, _sq_dists_dense(x, y, mask), what=f"S {shape} {dtype}")
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_forward_float64_accumulates_in_float64(device):
    fwd, _ = _triton()
    x, y, mask = _inputs((2, 5, 3, 777), torch.float64, "soft", device)
    out = fwd(x, y, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _sq_dists_dense(x, y, mask), rtol=1e-12, atol=1e-12)


def test_forward_hard_mask_splits_exactly(device):
    """With M in {0, 1}, the in/out sums are the plain sums over each region."""
    fwd, _ = _triton()
    x, y, mask = _inputs((2, 4, 2, 500), torch.float32, "hard", device)
    out = fwd(x, y, mask)
    inside = mask.bool()
    diff2 = (x.double()[:, None] - y.double()[:, :, None]) ** 2
    torch.testing.assert_close(out[..., 0].double(), diff2[..., inside].sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[..., 1].double(), diff2[..., ~inside].sum(-1), rtol=1e-5, atol=1e-5)
    assert float(out[..., 0].sum()) > 0 and float(out[..., 1].sum()) > 0


def test_forward_strided_inputs(device):
    """x with a padded row stride, y with a non-unit last stride (taken through a copy)."""
    fwd, _ = _triton()
    steps, group, anchors, dim = 2, 3, 2, 300
    x_wide = torch.randn(steps, group, dim + 7, device=device)
    x = x_wide[..., :dim]
    y = torch.randn(steps, dim, anchors, device=device).transpose(1, 2)
    mask = torch.rand(2 * dim, device=device)[::2]
    out = fwd(x, y, mask)
    ref = _sq_dists_dense(x.double(), y.double(), mask.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
def _dense_grads_fp64(grad, x, y, mask):
    """dx, dy of <grad, S> by autograd through the dense formula in float64."""
    xd = x.detach().double().requires_grad_()
    yd = y.detach().double().requires_grad_()
    (_sq_dists_dense(xd, yd, mask.double()) * grad.double()).sum().backward()
    return xd.grad, yd.grad


@pytest.mark.parametrize("mask_kind", ["soft", "hard"])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(shape, dtype, mask_kind, device):
    _, bwd = _triton()
    x, y, mask = _inputs(shape, dtype, mask_kind, device, seed=1)
    steps, group, anchors, _ = shape
    grad = torch.randn(steps, anchors, group, 2, generator=torch.Generator().manual_seed(2)).to(device)
    dx, dy = bwd(grad, x, y, mask)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dy.shape == y.shape and dy.dtype == y.dtype
    ref_dx, ref_dy = _dense_grads_fp64(grad, x, y, mask)
    torch_dx, torch_dy = region_sq_dists_bwd_torch(grad, x, y, mask)
    _assert_flash_rule(dx, ref_dx, torch_dx, what=f"dx {shape} {dtype}")
    _assert_flash_rule(dy, ref_dy, torch_dy, what=f"dy {shape} {dtype}")


def test_backward_float64(device):
    _, bwd = _triton()
    x, y, mask = _inputs((2, 13, 3, 333), torch.float64, "soft", device)
    grad = torch.randn(2, 3, 13, 2, dtype=torch.float64, device=device)
    dx, dy = bwd(grad, x, y, mask)
    ref_dx, ref_dy = _dense_grads_fp64(grad, x, y, mask)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy, ref_dy, rtol=1e-12, atol=1e-12)


def test_torch_reference_passes_gradcheck():
    x, y, mask = _inputs((2, 3, 2, 5), torch.float64, "soft", "cpu")
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: region_sq_dists(a, b, mask, backend="torch"), (x, y))


def test_triton_backend_passes_gradcheck(device):
    x, y, mask = _inputs((1, 3, 2, 4), torch.float64, "soft", device)
    x.requires_grad_()
    y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: region_sq_dists(a, b, mask, backend="triton"), (x, y))


# --------------------------------------------------------------------------------------------
# public API, autograd
# --------------------------------------------------------------------------------------------
def _policy_loss(x, y, mask, backend, tau_edit=0.9, tau_base=1.1, eps=1e-6):
    """A SPEC §5-shaped loss: log_softmax over candidates of −½ d²_C, weighted."""
    dim = x.shape[-1]
    area = mask.double().sum().float()
    S = region_sq_dists(x, y, mask, backend=backend)
    d2 = (dim / 2) * (S[..., 0] / (tau_edit**2 * (area + eps)) + S[..., 1] / (tau_base**2 * (dim - area + eps)))
    logp = torch.log_softmax(-0.5 * d2, dim=-1)  # over candidates i
    weights = torch.linspace(-1.0, 1.0, logp.shape[-1], device=logp.device, dtype=logp.dtype)
    return -(logp * weights).sum(), S


def _grads(x, y, mask, backend):
    x = x.detach().clone().requires_grad_()
    y = y.detach().clone().requires_grad_()
    loss, S = _policy_loss(x, y, mask, backend)
    loss.backward()
    return S.detach(), x.grad, y.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_autograd_matches_torch_backend(dtype, device):
    x, y, mask = _inputs((2, 12, 4, 640), dtype, "soft", device, seed=3)
    s_tri, dx_tri, dy_tri = _grads(x, y, mask, "triton")
    s_ref, dx_ref, dy_ref = _grads(x, y, mask, "torch")
    assert dx_tri.dtype == dtype and dy_tri.dtype == dtype
    assert float(dx_ref.abs().max()) > 0 and float(dy_ref.abs().max()) > 0
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(dx_tri, dx_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dy_tri, dy_ref, rtol=1e-4, atol=1e-6)
    else:
        _, dx64, dy64 = _grads(x.double(), y.double(), mask, "torch")
        _assert_flash_rule(dx_tri, dx64, dx_ref, what="dx bf16")
        _assert_flash_rule(dy_tri, dy64, dy_ref, what="dy bf16")


def test_public_api_grad_only_for_x(device):
    x, y, mask = _inputs((1, 4, 2, 130), torch.float32, "soft", device)
    x.requires_grad_()
    S = region_sq_dists(x, y, mask, backend="triton")
    S.sum().backward()
    expected = 2 * (x.detach()[:, None] - y[:, :, None]).sum(1)  # Σ_k 2(x_i − y_k), M + (1 − M) = 1
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    assert y.grad is None


# --------------------------------------------------------------------------------------------
# GPU: the target shape
# --------------------------------------------------------------------------------------------
TARGET = (28, 12, 4, 262144)  # T, G, K, D


@requires_cuda
@pytest.mark.gpu
def test_gpu_target_shape_forward_backward():
    fwd, bwd = _triton()
    x, y, mask = _inputs(TARGET, torch.bfloat16, "soft", "cuda")
    out = fwd(x, y, mask)
    ref = region_sq_dists_fwd_torch(x.double(), y.double(), mask.double())
    _assert_flash_rule(out, ref, region_sq_dists_fwd_torch(x, y, mask), what="S target")
    grad = torch.randn(28, 4, 12, 2, device="cuda")
    dx, dy = bwd(grad, x, y, mask)
    ref_dx, ref_dy = region_sq_dists_bwd_torch(grad.double(), x.double(), y.double(), mask.double())
    torch_dx, torch_dy = region_sq_dists_bwd_torch(grad, x, y, mask)
    _assert_flash_rule(dx, ref_dx, torch_dx, what="dx target")
    _assert_flash_rule(dy, ref_dy, torch_dy, what="dy target")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(3, 40, 9, 5000), (2, 1, 1, 1), (4, 12, 4, 4097)])
def test_gpu_multi_block_and_odd_shapes(shape):
    fwd, bwd = _triton()
    x, y, mask = _inputs(shape, torch.float32, "soft", "cuda")
    torch.testing.assert_close(fwd(x, y, mask), region_sq_dists_fwd_torch(x, y, mask), rtol=1e-5, atol=1e-4)
    grad = torch.randn(shape[0], shape[2], shape[1], 2, device="cuda")
    dx, dy = bwd(grad, x, y, mask)
    ref_dx, ref_dy = region_sq_dists_bwd_torch(grad, x, y, mask)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dy, ref_dy, rtol=1e-4, atol=1e-4)


# The bandwidth target (fwd+bwd >= 70% of a device copy) is measured, not asserted: the `copy`
# provider of benchmarks/test_bench_region_sq_dists.py times the copy in the same run, and each
# provider's extra_info has `fraction_of_copy_bw` (tests make no timing assertions).
