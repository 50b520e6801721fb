"""C++ (pybind11 + OpenMP) CPU backend: `rcgrpo_kernels._C` and its wrapper `cpp_ops`.

Checked against float64 computations written here and against the torch reference backend, at odd
sizes, for every input dtype, for thread-count independence, for strided (diffusers) layouts, and
for the size checks of the extension itself. The last test simulates an install without the
extension. tests/test_kernel_cpu_isa.py reruns this file with RCGRPO_CPU_ISA=avx2 and =baseline,
so that every ISA path of the kernels is checked against the same references.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import rcgrpo_kernels
from conftest import requires_backend
from rcgrpo_kernels import acd_attention, region_sq_dists

needs_cpp = requires_backend("cpp")

try:
    from rcgrpo_kernels import _C, cpp_ops
except ImportError:  # the tests using them are skipped by needs_cpp
    _C = cpp_ops = None


# ---------------------------------------------------------------------------------------------
# Independent float64 references
# ---------------------------------------------------------------------------------------------
def naive_acd(q, k, v, text_len, image_len, scale, weights=None):
    """float64 (out [B,H,N,D], mass [B,image_len]) straight from SPEC §7, materializing N x N."""
    qd, kd, vd = (t.double() for t in (q, k, v))
    logits = torch.einsum("bhnd,bhmd->bhnm", qd, kd) * scale
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    out = torch.einsum("bhnm,bhmd->bhnd", p / p.sum(-1, keepdim=True), vd)
    img = logits[:, :, :text_len, text_len : text_len + image_len]  # [B, H, v, u]
    e = torch.exp(img - img.amax(-1, keepdim=True))
    a = e / e.sum(-1, keepdim=True)
    w = torch.ones(q.shape[0], text_len, dtype=torch.float64) if weights is None else weights.double()
    mass = (a * w[:, None, :, None]).sum(2).mean(1)
    return out, mass


def naive_region(x, y, mask):
    """float64 S [T,K,G,2] with the [T,K,G,D] broadcast the kernels avoid."""
    diff = x.double()[:, None, :, :] - y.double()[:, :, None, :]
    sq = diff.square()
    m = mask.double()
    return torch.stack([(sq * m).sum(-1), (sq * (1 - m)).sum(-1)], dim=-1)


def qkv(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


# B, H, N, D, text_len, image_len: context tokens after the image, head dims that are not
# multiples of 16 or 8, more rows and keys than one tile (64), single tokens.
ACD_SHAPES = [
    (2, 3, 77, 48, 13, 40),
    (2, 1, 77, 16, 13, 40),
    (1, 3, 77, 64, 13, 64),
    (2, 2, 150, 20, 70, 65),
    (1, 2, 9, 3, 1, 1),
    (2, 1, 5, 1, 1, 4),
    (1, 1, 1 + 130, 8, 1, 130),
]


@needs_cpp
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", ACD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_acd_matches_float64_reference(shape, weighted):
    b, h, n, d, text_len, image_len = shape
    q, k, v = qkv((b, h, n, d), seed=n + d)
    w = torch.rand(b, text_len, generator=torch.Generator().manual_seed(1)) * 2 if weighted else None
    out, mass = acd_attention(q, k, v, text_len, image_len, text_weights=w, backend="cpp")
    ref_out, ref_mass = naive_acd(q, k, v, text_len, image_len, d**-0.5, w)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert mass.dtype == torch.float32 and mass.shape == (b, image_len)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-5, atol=1e-6)
    # Σ_u mass[b, u] = Σ_v w[b, v]
    expected = torch.full((b,), float(text_len)) if w is None else w.sum(-1)
    torch.testing.assert_close(mass.sum(-1), expected, rtol=2e-6, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("shape", ACD_SHAPES[:4], ids=lambda s: "x".join(map(str, s)))
def test_acd_matches_torch_backend(shape):
    b, h, n, d, text_len, image_len = shape
    q, k, v = qkv((b, h, n, d), seed=3)
    w = torch.rand(b, text_len, dtype=torch.float64)  # any float dtype is accepted
    got = acd_attention(q, k, v, text_len, image_len, scale=0.3, text_weights=w, backend="cpp")
    ref = acd_attention(q, k, v, text_len, image_len, scale=0.3, text_weights=w, backend="torch")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)


@needs_cpp
def test_acd_image_mass_when_image_keys_get_no_global_attention():
    """Text rows attend to text keys with logits ~100 above the image keys: the joint softmax
    underflows to 0 on the image keys in fp32, the image-only renormalization must not."""
    b, h, n, d, text_len, image_len = 1, 2, 90, 16, 10, 50
    q, k, v = qkv((b, h, n, d), seed=5)
    q[..., 0] = q[..., 0].abs() + 1.0
    k[:, :, :text_len, 0] += 100.0
    out, mass = acd_attention(q, k, v, text_len, image_len, scale=1.0, backend="cpp")
    ref_out, ref_mass = naive_acd(q, k, v, text_len, image_len, 1.0)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(mass).all() and abs(mass.sum().item() - text_len) < 1e-4


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_acd_low_precision_flash_rule(dtype):
    """Error vs the float64 result of the same (rounded) inputs ≤ 2x the error of torch doing the
    whole computation in `dtype`, plus a tiny floor; mass (fp32 output) stays fp32-accurate."""
    b, h, n, d, text_len, image_len = 2, 3, 77, 48, 13, 40
    q, k, v = qkv((b, h, n, d), dtype=dtype, seed=7)
    scale = d**-0.5
    out, mass = acd_attention(q, k, v, text_len, image_len, backend="cpp")
    assert out.dtype == dtype and mass.dtype == torch.float32
    ref_out, ref_mass = naive_acd(q, k, v, text_len, image_len, scale)
    torch_lp = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    assert torch_lp.dtype == dtype
    err = (out.double() - ref_out).abs().max().item()
    err_torch = (torch_lp.double() - ref_out).abs().max().item()
    assert err <= 2 * err_torch + 1e-5, (err, err_torch)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_acd_deterministic_across_thread_counts():
    q, k, v = qkv((2, 3, 150, 24), seed=11)
    w = torch.rand(2, 70)
    runs = [
        cpp_ops.acd_attention_cpp(q, k, v, 70, 60, 0.2, w, num_threads=nt) for nt in (1, 2, 3)
    ]
    for out, mass in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(mass, runs[0][1])


@needs_cpp
def test_auto_backend_picks_cpp_for_cpu_tensors():
    assert rcgrpo_kernels.resolve_backend("auto", torch.device("cpu"), "op") == "cpp"
    assert rcgrpo_kernels.available_backends()["cpp"] is None
    assert isinstance(_C.openmp_enabled(), bool) and _C.max_threads() >= 1


@needs_cpp
def test_float32_buffers_cross_without_copy():
    t = torch.randn(2, 3, 5, 4)
    assert cpp_ops._buffer(t, torch.float32).ctypes.data == t.data_ptr()
    # The sequence-major layout of diffusers crosses as it is (the kernels take its strides) ...
    strided = torch.randn(2, 5, 3, 4).transpose(1, 2)
    view = cpp_ops._unit_stride_view(strided)
    assert view.data_ptr() == strided.data_ptr() and view.stride() == strided.stride()
    assert view.numpy().ctypes.data == strided.data_ptr()
    # ... and only a non-unit stride in D is copied.
    assert cpp_ops._unit_stride_view(t.transpose(2, 3)).is_contiguous()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 77, 3, 48), (1, 9, 2, 3), (2, 150, 2, 20)], ids=lambda s: "x".join(map(str, s)))
def test_acd_sequence_major_layout_is_bitwise_equal_to_contiguous(shape, dtype):
    b, n, h, d = shape
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(b, n, h, d, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    text_len, image_len = min(7, n // 3), n // 2
    w = torch.rand(b, text_len, generator=g)
    out, mass = cpp_ops.acd_attention_cpp(q, k, v, text_len, image_len, 0.3, w)
    out_c, mass_c = cpp_ops.acd_attention_cpp(q.contiguous(), k.contiguous(), v.contiguous(), text_len, image_len, 0.3, w)
    assert torch.equal(out, out_c) and torch.equal(mass, mass_c)
    assert out.stride() == q.stride()  # out in q's layout: out.transpose(1, 2).flatten(2) is a view
    ref_out, ref_mass = naive_acd(q, k, v, text_len, image_len, 0.3, w)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_acd_other_strides_and_broadcast_keys():
    """Any B/H/N strides: keys shared by all heads (stride 0 over H) and rows with padding."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 40, 24, generator=g)
    k = torch.randn(2, 1, 40, 24, generator=g).expand(2, 3, 40, 24)
    v = torch.randn(2, 3, 40, 32, generator=g)[..., 4:28]
    assert k.stride(1) == 0 and v.stride(2) == 32
    out, mass = acd_attention(q, k, v, 9, 25, backend="cpp")
    ref_out, ref_mass = naive_acd(q, k, v, 9, 25, 24**-0.5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(mass.double(), ref_mass, rtol=1e-5, atol=1e-6)


@needs_cpp
def test_cpu_isa_matches_environment():
    """The ISA level in use is the CPU's, capped by RCGRPO_CPU_ISA (read at import)."""
    levels = ["baseline", "avx2", "avx512"]
    detected = _C.cpu_isa_detected()
    cap = os.environ.get("RCGRPO_CPU_ISA", "").strip().lower() or "avx512"
    expected = levels[min(levels.index(cap), levels.index(detected))]
    assert _C.cpu_isa() == expected == cpp_ops.cpu_isa()


# ---------------------------------------------------------------------------------------------
# region_sq_dists
# ---------------------------------------------------------------------------------------------
def region_inputs(t, g, k, d, dtype=torch.float32, seed=0, binary=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, g, d, generator=gen).to(dtype)
    y = torch.randn(t, k, d, generator=gen).to(dtype)
    mask = torch.rand(d, generator=gen)
    if binary:
        mask = (mask > 0.5).float()
    return x, y, mask.to(dtype)


# T, G, K, D
REGION_SHAPES = [(2, 3, 1, 1000), (2, 3, 1, 1), (3, 5, 4, 333), (1, 2, 3, 17), (2, 2, 2, 40000)]


@needs_cpp
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("shape", REGION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_region_forward_matches_float64_and_torch(shape, binary):
    x, y, mask = region_inputs(*shape, seed=shape[3], binary=binary)
    s = region_sq_dists(x, y, mask, backend="cpp")
    assert s.dtype == torch.float32 and s.shape == (shape[0], shape[2], shape[1], 2)
    torch.testing.assert_close(s.double(), naive_region(x, y, mask), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(s, region_sq_dists(x, y, mask, backend="torch"), rtol=1e-5, atol=1e-5)


@needs_cpp
def test_region_forward_float32_accuracy_at_large_d():
    x, y, mask = region_inputs(1, 2, 2, 262144, seed=3)
    s = region_sq_dists(x, y, mask, backend="cpp").double()
    ref = naive_region(x, y, mask)
    rel = ((s - ref).abs() / ref).max().item()
    assert rel < 1e-6, rel


@needs_cpp
@pytest.mark.parametrize("shape", REGION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_region_gradients_match_autograd_of_float64_reference(shape):
    x, y, mask = region_inputs(*shape, seed=1)
    x.requires_grad_(True)
    y.requires_grad_(True)
    s = region_sq_dists(x, y, mask, backend="cpp")
    ds = torch.randn(s.shape, generator=torch.Generator().manual_seed(2))
    dx, dy = torch.autograd.grad((s * ds).sum(), (x, y))
    assert dx.dtype == x.dtype and dy.dtype == y.dtype
    xd = x.detach().double().requires_grad_(True)
    yd = y.detach().double().requires_grad_(True)
    rdx, rdy = torch.autograd.grad((naive_region(xd, yd, mask) * ds.double()).sum(), (xd, yd))
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dy.double(), rdy, rtol=1e-5, atol=1e-5)
    # and the torch backend through the same public API
    xt = x.detach().requires_grad_(True)
    yt = y.detach().requires_grad_(True)
    (region_sq_dists(xt, yt, mask, backend="torch") * ds).sum().backward()
    torch.testing.assert_close(dx, xt.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dy, yt.grad, rtol=1e-5, atol=1e-5)


@needs_cpp
def test_region_float64_gradcheck():
    x, y, mask = region_inputs(2, 3, 2, 7, dtype=torch.float64, seed=4)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert region_sq_dists(x, y, mask, backend="cpp").dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: region_sq_dists(a, b, mask, backend="cpp"), (x, y))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_region_low_precision_inputs(dtype):
    x, y, mask = region_inputs(2, 3, 2, 1000, dtype=dtype, seed=6)
    x.requires_grad_(True)
    y.requires_grad_(True)
    s = region_sq_dists(x, y, mask, backend="cpp")
    assert s.dtype == torch.float32
    # the rounded inputs are exact in fp32: S is fp32-accurate for them
    torch.testing.assert_close(s.double(), naive_region(x.detach(), y.detach(), mask), rtol=2e-6, atol=1e-6)
    ds = torch.randn(s.shape, generator=torch.Generator().manual_seed(2))
    dx, dy = torch.autograd.grad((s * ds).sum(), (x, y))
    assert dx.dtype == dtype and dy.dtype == dtype
    xt = x.detach().requires_grad_(True)
    yt = y.detach().requires_grad_(True)
    rdx, rdy = torch.autograd.grad((region_sq_dists(xt, yt, mask, backend="torch") * ds).sum(), (xt, yt))
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(dx, rdx, **tol)
    torch.testing.assert_close(dy, rdy, **tol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_region_deterministic_across_thread_counts(dtype):
    x, y, mask = region_inputs(2, 3, 2, 40000, dtype=dtype, seed=8)  # several D spans and chunks
    ds = torch.randn(2, 2, 3, 2, dtype=dtype)
    fwd = [cpp_ops.region_sq_dists_fwd_cpp(x, y, mask, num_threads=nt) for nt in (1, 2, 3)]
    bwd = [cpp_ops.region_sq_dists_bwd_cpp(ds, x, y, mask, num_threads=nt) for nt in (1, 2, 3)]
    for s in fwd[1:]:
        assert torch.equal(s, fwd[0])
    for dx, dy in bwd[1:]:
        assert torch.equal(dx, bwd[0][0]) and torch.equal(dy, bwd[0][1])


# ---------------------------------------------------------------------------------------------
# Size checks of the extension itself (called with inconsistent buffers, bypassing the Python op)
# ---------------------------------------------------------------------------------------------
def _arr(*shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


@needs_cpp
@pytest.mark.parametrize(
    "args, match",
    [
        ((_arr(2, 10, 8), _arr(2, 10, 8), _arr(2, 10, 8), 2, 3, 0.5), "4-D"),
        ((_arr(1, 2, 10, 8), _arr(1, 2, 11, 8), _arr(1, 2, 10, 8), 2, 3, 0.5), "share one shape"),
        ((_arr(1, 2, 10, 8), _arr(1, 2, 10, 8), _arr(1, 2, 10, 4), 2, 3, 0.5), "share one shape"),
        ((_arr(1, 2, 10, 8), _arr(1, 2, 10, 8), _arr(1, 2, 10, 8), 6, 5, 0.5), "exceeds"),
        ((_arr(1, 2, 10, 8), _arr(1, 2, 10, 8), _arr(1, 2, 10, 8), 0, 5, 0.5), ">= 1"),
        ((_arr(1, 2, 10, 8), _arr(1, 2, 10, 8), _arr(1, 2, 10, 8), 2, 3, float("nan")), "scale"),
        ((_arr(1, 2, 10, 8), _arr(1, 2, 10, 8), _arr(1, 2, 10, 8), 2, 3, 0.0), "scale"),
        ((_arr(1, 2, 0, 8), _arr(1, 2, 0, 8), _arr(1, 2, 0, 8), 2, 3, 0.5), "non-empty"),
    ],
)
def test_extension_rejects_inconsistent_attention_buffers(args, match):
    with pytest.raises(ValueError, match=match):
        _C.acd_attention(*args)


@needs_cpp
def test_extension_rejects_bad_text_weights_and_threads():
    q = _arr(2, 2, 10, 8)
    with pytest.raises(ValueError, match="text_weights"):
        _C.acd_attention(q, q, q, 3, 4, 0.5, _arr(2, 4))
    with pytest.raises(ValueError, match="text_weights"):
        _C.acd_attention(q, q, q, 3, 4, 0.5, _arr(6))
    with pytest.raises(ValueError, match="num_threads"):
        _C.acd_attention(q, q, q, 3, 4, 0.5, None, -1)
    out, mass = _C.acd_attention(q, q, q, 3, 4, 0.5, _arr(2, 3), 1)  # consistent: runs
    assert out.shape == (2, 2, 10, 8) and mass.shape == (2, 4)


@needs_cpp
def test_extension_rejects_bad_strides_and_out():
    q = _arr(1, 2, 10, 8)
    with pytest.raises(ValueError, match="q must have unit stride in its last dimension"):
        _C.acd_attention(np.zeros((1, 2, 10, 16), np.float32)[..., ::2], q, q, 2, 3, 0.5)
    with pytest.raises(ValueError, match="out must have the shape of q"):
        _C.acd_attention(q, q, q, 2, 3, 0.5, None, 0, _arr(1, 2, 10, 7))
    with pytest.raises(ValueError, match="out must be a float32 array"):
        _C.acd_attention(q, q, q, 2, 3, 0.5, None, 0, np.zeros((1, 2, 10, 8)))
    out = np.zeros((1, 10, 2, 8), np.float32).transpose(0, 2, 1, 3)  # strided out is filled in place
    got, _ = _C.acd_attention(np.ones_like(q), np.ones_like(q), np.ones_like(q), 2, 3, 0.5, None, 0, out)
    assert got is out and np.all(out == 1.0)


@needs_cpp
@pytest.mark.parametrize("suffix, dtype", [("f32", np.float32), ("f64", np.float64)])
def test_extension_rejects_inconsistent_region_buffers(suffix, dtype):
    fwd = getattr(_C, f"region_sq_dists_fwd_{suffix}")
    bwd = getattr(_C, f"region_sq_dists_bwd_{suffix}")
    x, y, m = _arr(2, 3, 10, dtype=dtype), _arr(2, 4, 10, dtype=dtype), _arr(10, dtype=dtype)
    assert fwd(x, y, m).shape == (2, 4, 3, 2)
    with pytest.raises(ValueError, match="y must have shape"):
        fwd(x, _arr(2, 4, 9, dtype=dtype), m)
    with pytest.raises(ValueError, match="y must have shape"):
        fwd(x, _arr(3, 4, 10, dtype=dtype), m)
    with pytest.raises(ValueError, match="mask"):
        fwd(x, y, _arr(11, dtype=dtype))
    with pytest.raises(ValueError, match="x must be 3-D"):
        fwd(_arr(3, 10, dtype=dtype), y, m)
    with pytest.raises(ValueError, match="non-empty"):
        fwd(_arr(2, 0, 10, dtype=dtype), y, m)
    with pytest.raises(ValueError, match="num_threads"):
        fwd(x, y, m, -2)
    dx, dy = bwd(_arr(2, 4, 3, 2, dtype=dtype), x, y, m)
    assert dx.shape == x.shape and dy.shape == y.shape
    with pytest.raises(ValueError, match="dS must have shape"):
        bwd(_arr(2, 3, 4, 2, dtype=dtype), x, y, m)


# ---------------------------------------------------------------------------------------------
# Without the extension (simulated in a subprocess that cannot import rcgrpo_kernels._C)
# ---------------------------------------------------------------------------------------------
_NO_EXT_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rcgrpo_kernels._C":
                raise ImportError("blocked by the test: simulated install without a compiler")
            return None

    sys.meta_path.insert(0, BlockExtension())

    import torch
    import rcgrpo_kernels as rk

    reason = rk.available_backends()["cpp"]
    assert reason is not None and "not built" in reason and "simulated install" in reason, reason
    assert rk.resolve_backend("auto", torch.device("cpu"), "op") == "torch"

    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    out, mass = rk.acd_attention(q, k, v, 3, 5, backend="auto")
    ref_out, ref_mass = rk.acd_attention(q, k, v, 3, 5, backend="torch")
    assert torch.equal(out, ref_out) and torch.equal(mass, ref_mass)
    x, y, m = torch.randn(2, 3, 7), torch.randn(2, 1, 7), torch.rand(7)
    assert torch.equal(rk.region_sq_dists(x, y, m), rk.region_sq_dists(x, y, m, backend="torch"))
    for call in (lambda: rk.acd_attention(q, k, v, 3, 5, backend="cpp"),
                 lambda: rk.region_sq_dists(x, y, m, backend="cpp")):
        try:
            call()
        except RuntimeError as exc:
            assert "'cpp' cannot run" in str(exc) and "not built" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' ran without the extension")
    assert "rcgrpo_kernels._C" not in sys.modules
    print("fallback ok")
    """
)


def test_without_extension_auto_falls_back_and_cpp_explains():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", _NO_EXT_SCRIPT], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fallback ok" in proc.stdout
