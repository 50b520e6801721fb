"""The public ops with the torch reference backend: semantics, dispatch and input errors (SPEC §8)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rcgrpo_kernels import acd_attention, available_backends, region_sq_dists
from rcgrpo_kernels._backends import resolve_backend


def _materialized_mass(q, k, text_len, image_len, scale, w=None):
    s = torch.einsum("bhvd,bhud->bhvu", q[:, :, :text_len].double(), k[:, :, text_len : text_len + image_len].double())
    a = torch.softmax(s * scale, dim=-1)
    if w is not None:
        a = a * w.double()[:, None, :, None]
    return a.sum(2).mean(1)


@pytest.mark.parametrize("shape, text_len, image_len", [((2, 3, 77, 16), 13, 40), ((1, 1, 2, 8), 1, 1), ((1, 2, 600, 32), 100, 300)])
def test_acd_attention_torch_matches_sdpa_and_materialized_mass(shape, text_len, image_len):
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape) for _ in range(3))
    w = torch.rand(shape[0], text_len)
    out, mass = acd_attention(q, k, v, text_len, image_len, text_weights=w, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    scale = shape[-1] ** -0.5
    torch.testing.assert_close(mass.double(), _materialized_mass(q, k, text_len, image_len, scale, w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mass.sum(-1), w.sum(-1), rtol=1e-5, atol=1e-5)
    assert mass.dtype == torch.float32 and out.dtype == q.dtype


def test_acd_attention_custom_scale_and_low_precision():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.bfloat16) for _ in range(3))
    out, mass = acd_attention(q, k, v, 10, 30, scale=0.3, backend="torch")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=0.3)
    torch_err = (F.scaled_dot_product_attention(q, k, v, scale=0.3).float() - ref).abs().max()
    assert (out.float() - ref).abs().max() <= 2 * torch_err + 1e-6
    torch.testing.assert_close(mass.double(), _materialized_mass(q.float(), k.float(), 10, 30, 0.3), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text_len=0), "text_len must be an int ≥ 1"),
        (dict(image_len=100), "exceeds the sequence length"),
        (dict(scale=float("nan")), "scale must be a finite positive number"),
        (dict(text_weights=torch.ones(2, 3)), r"text_weights must have shape \[B, text_len\]"),
        (dict(mode="eager"), "mode must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_acd_attention_bad_input(kwargs, message):
    q = torch.randn(1, 2, 20, 8)
    args = dict(text_len=5, image_len=10)
    args.update(kwargs)
    text_len, image_len = args.pop("text_len"), args.pop("image_len")
    with pytest.raises(ValueError, match=message):
        acd_attention(q, q, q, text_len, image_len, **args)


def test_acd_attention_shape_dtype_and_nonfinite_errors():
    q = torch.randn(1, 2, 20, 8)
    with pytest.raises(ValueError, match="must share the shape"):
        acd_attention(q, q[:, :, :10], q, 5, 5)
    with pytest.raises(ValueError, match="must share a dtype"):
        acd_attention(q, q.half(), q, 5, 5)
    with pytest.raises(ValueError, match="4 dimensions"):
        acd_attention(q[0], q[0], q[0], 5, 5)
    bad = q.clone()
    bad[0, 0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="k contains NaN or inf"):
        acd_attention(q, bad, q, 5, 5)


def test_acd_attention_is_forward_only():
    q = torch.randn(1, 1, 8, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        acd_attention(q, q, q, 2, 3)
    with torch.no_grad():
        acd_attention(q, q, q, 2, 3)


def test_region_sq_dists_reference_values_and_gradcheck():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 100, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 2, 100, dtype=torch.float64, requires_grad=True)
    m = torch.rand(100, dtype=torch.float64)
    S = region_sq_dists(x, y, m, backend="torch")
    diff2 = (x[:, None] - y[:, :, None]) ** 2
    torch.testing.assert_close(S[..., 0], (diff2 * m).sum(-1))
    torch.testing.assert_close(S[..., 1], (diff2 * (1 - m)).sum(-1))
    assert torch.autograd.gradcheck(lambda a, b: region_sq_dists(a, b, m, backend="torch"), (x, y))


def test_region_sq_dists_low_precision_gradients_in_input_dtype():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(2, 1, 64, dtype=torch.bfloat16, requires_grad=True)
    S = region_sq_dists(x, y, torch.rand(64), backend="torch")
    assert S.dtype == torch.float32
    S.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and y.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "x_shape, y_shape, m_shape, message",
    [
        ((2, 3, 10), (3, 1, 10), (10,), r"y must have shape \[T, K, D\]"),
        ((2, 3, 10), (2, 1, 10), (9,), r"mask must have shape \[D\] = \[10\]"),
        ((2, 3), (2, 1, 10), (10,), "x must have 3 dimensions"),
        ((2, 0, 10), (2, 1, 10), (10,), "non-empty"),
    ],
)
def test_region_sq_dists_bad_shapes(x_shape, y_shape, m_shape, message):
    with pytest.raises(ValueError, match=message):
        region_sq_dists(torch.zeros(x_shape), torch.zeros(y_shape), torch.zeros(m_shape))


def test_region_sq_dists_mask_range_and_finite():
    x, y = torch.zeros(1, 2, 4), torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        region_sq_dists(x, y, torch.tensor([0.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="x contains NaN"):
        region_sq_dists(x.clone().fill_(math.nan), y, torch.zeros(4))


def test_backend_dispatch_explains_unavailable_backends():
    reasons = available_backends()
    assert reasons["torch"] is None
    assert resolve_backend("torch", torch.device("cpu"), "op") == "torch"
    assert resolve_backend("auto", torch.device("cpu"), "op") in ("cpp", "torch")
    if reasons["cpp"] is not None:
        with pytest.raises(RuntimeError, match="backend 'cpp' cannot run"):
            resolve_backend("cpp", torch.device("cpu"), "op")


def test_ops_trace_under_torch_compile():
    q = torch.randn(1, 2, 24, 8)
    x, y, m = torch.randn(2, 3, 16), torch.randn(2, 1, 16), torch.rand(16)

    def f(q, x, y):
        out, mass = torch.ops.rcgrpo.acd_attention(q, q, q, 4, 10, 8**-0.5, None, "torch", "fused")
        return out.sum() + mass.sum() + torch.ops.rcgrpo.region_sq_dists(x, y, m, "torch").sum()

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, x, y), f(q, x, y))


# --------------------------------------------------------------------------------------------
# acd_attention_eager: the materialized baseline of the benchmarks and the dry run
# --------------------------------------------------------------------------------------------
def test_eager_baseline_matches_sdpa_and_materialized_mass():
    from rcgrpo_kernels.acd_attention import acd_attention_eager

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 45, 12, generator=g) for _ in range(3))
    w = torch.rand(2, 9, generator=g)
    out, mass = acd_attention_eager(q, k, v, 9, 20, text_weights=w)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
    ref = _materialized_mass(q, k, 9, 20, 12**-0.5, w)
    torch.testing.assert_close(mass.double(), ref, rtol=1e-5, atol=1e-6)


def test_eager_baseline_mass_is_fp32_when_fp16_image_weights_underflow():
    """Text keys beat the image keys by ~40 nats: every image weight of a text row is 0 in fp16
    (smallest subnormal ~e^-16.6), and renormalizing fp16 weights over the image keys gave NaN."""
    from rcgrpo_kernels.acd_attention import acd_attention_eager

    g = torch.Generator().manual_seed(6)
    q, k, v = (0.3 * torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    q[..., 0] = 5.0
    k[:, :, :8, 0] = 8.0  # text keys
    q, k, v = (t.half() for t in (q, k, v))
    w = torch.rand(1, 8, generator=g)
    weights16 = torch.softmax((q.float() @ k.float().transpose(-1, -2)), -1).half()
    assert not weights16[:, :, :8, 8:32].any()  # the fp16 weights of text rows on image keys underflow
    out, mass = acd_attention_eager(q, k, v, 8, 24, scale=1.0, text_weights=w)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert mass.dtype == torch.float32 and torch.isfinite(mass).all()
    torch.testing.assert_close(mass.sum(-1), w.sum(-1), rtol=1e-5, atol=1e-5)
    ref = _materialized_mass(q.double(), k.double(), 8, 24, 1.0, w)
    torch.testing.assert_close(mass.double(), ref, rtol=2e-3, atol=1e-5)  # fp16 logits: ~1e-4 relative


# --------------------------------------------------------------------------------------------
# Layouts and modes of the public op (torch backend; the others in their own test files)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_takes_the_sequence_major_layout(dtype):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 45, 3, 16, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous() and q.stride(-1) == 1
    w = torch.rand(2, 9, generator=g)
    out, mass = acd_attention(q, k, v, 9, 20, text_weights=w, backend="torch")
    out_c, mass_c = acd_attention(q.contiguous(), k.contiguous(), v.contiguous(), 9, 20, text_weights=w, backend="torch")
    assert out.stride() == q.stride()  # out in q's layout
    torch.testing.assert_close(out, out_c, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
    torch.testing.assert_close(mass, mass_c, rtol=1e-6, atol=1e-7)
    ref = _materialized_mass(q.float(), k.float(), 9, 20, 0.25, w)
    torch.testing.assert_close(mass.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["auto", "fused", "sdpa"])
def test_every_mode_is_accepted_by_every_cpu_backend(mode):
    q = torch.randn(1, 2, 20, 8)
    ref = acd_attention(q, q, q, 5, 10, backend="torch", mode="fused")
    for backend in ("torch", "auto"):
        out, mass = acd_attention(q, q, q, 5, 10, backend=backend, mode=mode)
        torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mass, ref[1], rtol=1e-5, atol=1e-6)
