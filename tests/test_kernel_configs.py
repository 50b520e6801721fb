"""Every GPU launch configuration of the Triton kernels, run under TRITON_INTERPRET=1 (or on CUDA).

CI has no GPU, and under the interpreter the launchers use one small config per kernel, so the
autotune lists (`GPU_*_CONFIGS` of triton_acd_attention.py) and the block configurations of the
region_sq_dists heuristic (`gpu_fwd_configs()`, `gpu_bwd_configs()`) would otherwise never run.
Each is launched here with explicit meta-parameters (the autotuned kernels' underlying jit
functions) at small odd shapes that give every tile loop a masked tail, and checked against
float64 references written here. Precision rules as in the per-op test files: fp32 ~1e-5; bf16
`out` within 2× the error of torch SDPA in bf16; masses and distances fp32-accurate.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import requires_backend  # noqa: E402
from rcgrpo_kernels import triton_acd_attention as tri  # noqa: E402
from rcgrpo_kernels import triton_region_sq_dists as trd  # noqa: E402

pytestmark = [requires_backend("triton"), pytest.mark.slow]


def _cfg_id(cfg):
    blocks = "-".join(f"{k[6:]}{v}" for k, v in cfg.kwargs.items())
    return f"{blocks}-w{cfg.num_warps}-s{cfg.num_stages}"


def _device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# acd_attention: B=1, H=3, N=150 = 70 text (more than one 64-row tile, a tail) + 50 image + 30
# context; D=48 runs padded to 64.
# ---------------------------------------------------------------------------------------------
B, H, N, TEXT, IMAGE = 1, 3, 150, 70, 50


def _attn_inputs(dtype, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, head_dim, generator=g) for _ in range(3))
    w = torch.rand(B, TEXT, generator=g) * 2
    dev = _device()
    return (1.5 * q).to(dev, dtype), k.to(dev, dtype), v.to(dev, dtype), w.to(dev)


def _attn_reference(q, k, v, scale, w):
    """float64 out [B,H,N,D] and mass [B,I] (SPEC §7) from materialized weights."""
    qd, kd, vd = (t.double() for t in (q, k, v))
    logits = qd @ kd.transpose(-1, -2) * scale
    out = torch.softmax(logits, -1) @ vd
    a = torch.softmax(logits[:, :, :TEXT, TEXT : TEXT + IMAGE], -1) * w.double()[:, None, :, None]
    return out, a.sum(2).mean(1)


def _check_attention(out, mass, q, k, v, scale, w, check_out=True):
    ref_out, ref_mass = _attn_reference(q, k, v, scale, w)
    if check_out:
        if q.dtype == torch.float32:
            torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        else:
            err = (out.double() - ref_out).abs().max().item()
            base = (F.scaled_dot_product_attention(q, k, v, scale=scale).double() - ref_out).abs().max().item()
            assert err <= 2 * base + 1e-5, f"out error {err:.3g} > 2 × torch SDPA error {base:.3g}"
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-5, rtol=1e-4)


CASES = [(torch.float32, 48), (torch.bfloat16, 64)]


@pytest.mark.parametrize("dtype,head_dim", CASES, ids=["fp32-d48", "bf16-d64"])
@pytest.mark.parametrize("cfg", tri.GPU_FWD_CONFIGS, ids=_cfg_id)
def test_every_gpu_config_of_the_fused_kernel(cfg, dtype, head_dim):
    q, k, v, w = _attn_inputs(dtype, head_dim)
    scale = head_dim**-0.5
    out, mass = tri.acd_attention_triton(q, k, v, TEXT, IMAGE, scale, w, mode="fused", configs={"fwd": cfg})
    _check_attention(out, mass, q, k, v, scale, w)


@pytest.mark.parametrize("dtype,head_dim", CASES, ids=["fp32-d48", "bf16-d64"])
@pytest.mark.parametrize("cfg", tri.GPU_LSE_CONFIGS, ids=_cfg_id)
def test_every_gpu_config_of_the_image_lse_kernel(cfg, dtype, head_dim):
    q, k, v, w = _attn_inputs(dtype, head_dim, seed=1)
    scale = head_dim**-0.5
    out, mass = tri.acd_attention_triton(q, k, v, TEXT, IMAGE, scale, w, mode="sdpa", configs={"lse": cfg})
    _check_attention(out, mass, q, k, v, scale, w, check_out=False)  # out is SDPA's


@pytest.mark.parametrize("dtype,head_dim", CASES, ids=["fp32-d48", "bf16-d64"])
@pytest.mark.parametrize("cfg", tri.GPU_MASS_CONFIGS, ids=_cfg_id)
def test_every_gpu_config_of_the_mass_kernel(cfg, dtype, head_dim):
    q, k, v, w = _attn_inputs(dtype, head_dim, seed=2)
    scale = head_dim**-0.5
    # 3 heads in 2 splits (2 + 1): the uneven split and the partial reduction.
    out, mass = tri.acd_attention_triton(q, k, v, TEXT, IMAGE, scale, w, mode="sdpa", head_splits=2,
                                         configs={"mass": cfg})
    _check_attention(out, mass, q, k, v, scale, w, check_out=False)


def test_config_lists_are_the_autotuned_ones():
    """The lists tested above are the ones the CUDA path autotunes over."""
    assert tri._acd_fwd_kernel.configs == tri.GPU_FWD_CONFIGS
    assert tri._image_lse_kernel.configs == tri.GPU_LSE_CONFIGS
    assert tri._acd_mass_kernel.configs == tri.GPU_MASS_CONFIGS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
def test_config_pruning_keeps_a_config_within_the_budget(head_dim, dtype):
    """The early pruning of the autotuner never leaves an empty list; what it keeps fits the
    shared-memory budget (or is the smallest config, as the last resort)."""
    for kernel, resident, streamed, n_streamed, acc in (
        (tri._acd_fwd_kernel, "BLOCK_M", "BLOCK_N", 2, True),
        (tri._image_lse_kernel, "BLOCK_M", "BLOCK_N", 1, False),
        (tri._acd_mass_kernel, "BLOCK_U", "BLOCK_V", 1, False),
    ):
        prune = tri._prune(resident, streamed, n_streamed, acc)
        q = torch.empty(1, dtype=dtype)
        kept = prune(kernel.configs, {"Q": q, "HEAD_DIM": head_dim})
        assert kept and all(c in kernel.configs for c in kept)
        elt = q.element_size()
        copies = 2 if elt == 4 else 1

        def smem(c):
            return elt * head_dim * (copies * c.kwargs[resident] + c.num_stages * n_streamed * c.kwargs[streamed])

        assert all(smem(c) <= tri._SMEM_BUDGET for c in kept) or kept == [min(kernel.configs, key=smem)]


# ---------------------------------------------------------------------------------------------
# region_sq_dists: every block configuration of the GPU heuristic
# ---------------------------------------------------------------------------------------------
def _region_inputs(steps, group, anchors, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(steps, 1, dim, generator=g)
    x = (base + 0.3 * torch.randn(steps, group, dim, generator=g)).to(dtype)
    y = (base + 0.3 * torch.randn(steps, anchors, dim, generator=g)).to(dtype)
    mask = torch.rand(dim, generator=g)
    dev = _device()
    return x.to(dev), y.to(dev), mask.to(dev)


def _region_dense(x, y, mask):
    sq = (x.double()[:, None] - y.double()[:, :, None]) ** 2  # [T, K, G, D]
    m = mask.double()
    return torch.stack(((sq * m).sum(-1), (sq * (1 - m)).sum(-1)), dim=-1)


def _fwd_id(cfg):
    return f"K{cfg['BLOCK_K']}-G{cfg['BLOCK_G']}-D{cfg['BLOCK_D']}-{'f64' if cfg['wide_acc'] else 'f32'}"


@pytest.mark.parametrize("cfg", trd.gpu_fwd_configs(), ids=_fwd_id)
def test_every_gpu_block_config_of_the_distance_forward(cfg):
    # One more candidate and anchor than a block holds (a second, padded block each), 2 tiles per
    # chunk and 2.5 chunks of D, so every loop has a tail.
    bk, bg, bd = cfg["BLOCK_K"], cfg["BLOCK_G"], cfg["BLOCK_D"]
    dtype = torch.float64 if cfg["wide_acc"] else torch.bfloat16
    steps, group, anchors, dim = 2, bg + 1, bk + 1, 5 * bd + 3
    x, y, mask = _region_inputs(steps, group, anchors, dim, dtype)
    launch = dict(BLOCK_K=bk, BLOCK_G=bg, BLOCK_D=bd, tiles=2, num_warps=cfg["num_warps"])
    out = trd.region_sq_dists_fwd_triton(x, y, mask, config=launch)
    assert out.shape == (steps, anchors, group, 2)
    ref = _region_dense(x, y, mask)
    if dtype == torch.float64:
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    else:  # bf16 inputs are exact in fp32: S is fp32-accurate
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_forward_config_list_covers_the_heuristic():
    """gpu_fwd_configs() holds the heuristic's choice for any shape (BLOCK_D capped only by small D)."""
    listed = {(c["BLOCK_K"], c["BLOCK_G"], c["BLOCK_D"], c["wide_acc"]) for c in trd.gpu_fwd_configs()}
    for anchors in (1, 3, 4, 9, 40):
        for group in (1, 5, 12, 13, 100):
            for wide in (False, True):
                c = trd._gpu_fwd_blocks(group, anchors, 262144, wide)
                assert (c["BLOCK_K"], c["BLOCK_G"], c["BLOCK_D"], wide) in listed
    assert trd._gpu_fwd_blocks(12, 4, 262144, False)["BLOCK_K"] * trd._gpu_fwd_blocks(12, 4, 262144, False)["BLOCK_G"] <= 64


@pytest.mark.parametrize("cfg", trd.gpu_bwd_configs(), ids=lambda c: f"G{c['BLOCK_G']}-D{c['BLOCK_D']}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_gpu_block_config_of_the_distance_backward(cfg, dtype):
    bg, bd = cfg["BLOCK_G"], cfg["BLOCK_D"]
    steps, group, anchors, dim = 2, bg + 1, 3, 2 * bd + bd // 2 + 1  # two candidate blocks, a D tail
    x, y, mask = _region_inputs(steps, group, anchors, dim, dtype, seed=1)
    grad = torch.randn(steps, anchors, group, 2, generator=torch.Generator().manual_seed(2)).to(x.device)
    dx, dy = trd.region_sq_dists_bwd_triton(grad, x, y, mask, config=cfg)
    assert dx.dtype == dtype and dy.dtype == dtype
    xd, yd = x.double().requires_grad_(), y.double().requires_grad_()
    (_region_dense(xd, yd, mask) * grad.double()).sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(dx.double(), xd.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dy.double(), yd.grad, rtol=1e-5, atol=1e-5)
    else:  # fp32 accumulation, one rounding to bf16 (to nearest: the interpreter workaround)
        for got, ref in ((dx, xd.grad), (dy, yd.grad)):
            torch.testing.assert_close(got.double(), ref, rtol=2 ** -8, atol=1e-5 * ref.abs().max().item())
