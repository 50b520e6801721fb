"""Triton backend of `acd_attention` (kernels/triton_acd_attention.py).

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest) with one
fixed 16×16 tile config, so the small odd shapes below exercise every masked tail. The references
are computed here, independently of the package: float64 softmax attention (CPU) or float32 (GPU),
and the text→image mass from the materialized text×image weights.

Low-precision rule (flash-attention's): max error of Triton vs the reference ≤ 2 × the max error
of the same computation done by torch in that dtype, + 1e-5.
"""
import pytest
import torch

pytest.importorskip("triton")

from conftest import requires_backend, requires_cuda  # noqa: E402

import rcgrpo_kernels  # noqa: E402
from rcgrpo_kernels.triton_acd_attention import acd_attention_triton  # noqa: E402

pytestmark = requires_backend("triton")
interp = pytest.mark.slow  # launches kernels: seconds each under the interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = ["fused", "sdpa"]


def reference(q, k, v, text_len, image_len, scale, weights, dtype, head_chunk=4):
    """(out, mass) with logits, softmax and P·V in `dtype` (float64/32: reference; q.dtype: the
    torch-in-dtype baseline). Probabilities are summed in float64. out `[B,H,N,D]`, mass `[B,I]`."""
    batch, heads, seq, _ = q.shape
    image = slice(text_len, text_len + image_len)
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    mass = torch.zeros(batch, image_len, dtype=torch.float64, device=q.device)
    for h0 in range(0, heads, head_chunk):
        hs = slice(h0, min(h0 + head_chunk, heads))
        qh, kh, vh = (t[:, hs].to(dtype) for t in (q, k, v))
        logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
        out[:, hs] = torch.matmul(torch.softmax(logits, dim=-1), vh)
        weights_h = torch.softmax(logits[:, :, :text_len, image], dim=-1).double()
        del logits
        if weights is not None:
            weights_h = weights_h * weights.double()[:, None, :, None]
        mass += weights_h.sum(dim=(1, 2))
    return out, mass / heads


def make_inputs(batch, heads, seq, head_dim, dtype, device, seed=0, weighted=False, text_len=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen) for _ in range(3))
    q = q * 1.5  # peakier attention than the uniform-ish default
    w = torch.rand(batch, text_len, generator=gen) * 2 if weighted else None
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (None if w is None else w.to(device))


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def check(q, k, v, text_len, image_len, weights, mode, scale=None, ref_dtype=torch.float64, fp32_atol=1e-5):
    """Run the Triton backend and check out and mass against the references."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, mass = acd_attention_triton(q, k, v, text_len, image_len, scale, weights, mode=mode)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert mass.shape == (q.shape[0], image_len) and mass.dtype == torch.float32
    ref_out, ref_mass = reference(q, k, v, text_len, image_len, scale, weights, ref_dtype)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out.double(), atol=fp32_atol, rtol=1e-5)
    else:
        base_out, base_mass = reference(q, k, v, text_len, image_len, scale, weights, q.dtype)
        err, base = max_err(out, ref_out), max_err(base_out, ref_out)
        assert err <= 2 * base + 1e-5, f"out error {err:.3g} > 2 × torch {q.dtype} error {base:.3g}"
        err, base = max_err(mass, ref_mass), max_err(base_mass, ref_mass)
        assert err <= 2 * base + 1e-5, f"mass error {err:.3g} > 2 × torch {q.dtype} error {base:.3g}"
    # Logits are accumulated in fp32 from the (exact) inputs whatever their dtype, so the mass is
    # fp32-accurate for every dtype.
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-5, rtol=1e-4)
    expected = torch.full_like(mass[:, 0], text_len) if weights is None else weights.float().sum(-1)
    torch.testing.assert_close(mass.sum(-1), expected, atol=1e-5, rtol=1e-5)
    return out, mass


@interp
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("heads,weighted", [(1, False), (3, True)])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_sizes_with_context_after_image(dtype, head_dim, heads, weighted, mode, device):
    # N=77: 13 text, 40 image, 24 context tokens; no size is a multiple of the 16-wide tiles.
    q, k, v, w = make_inputs(2, heads, 77, head_dim, dtype, device, weighted=weighted, text_len=13)
    check(q, k, v, 13, 40, w, mode)


@interp
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seq", [2, 5])
def test_single_text_and_image_token(seq, dtype, mode, device):
    q, k, v, w = make_inputs(1, 2, seq, 32, dtype, device, seed=1)
    out, mass = check(q, k, v, 1, 1, w, mode)
    torch.testing.assert_close(mass, torch.ones_like(mass))  # one image key takes all the mass


@interp
@pytest.mark.parametrize("mode", MODES)
def test_text_spans_several_tiles_and_image_ends_sequence(mode, device):
    # 37 text rows cover three query tiles, the last one partly; T + I = N (no context keys).
    q, k, v, w = make_inputs(1, 2, 64, 32, torch.float16, device, seed=2, weighted=True, text_len=37)
    check(q, k, v, 37, 27, w, mode)


@interp
@pytest.mark.parametrize("mode", MODES)
def test_text_logits_dwarf_image_logits(mode, device):
    # Text keys beat image keys by ~100 nats, which would underflow an image sum kept relative to
    # the full-row max; the image-only running max keeps the mass exact.
    q, k, v, _ = make_inputs(1, 2, 40, 16, torch.float32, device, seed=3)
    q[..., 0] = 20.0
    k[:, :, :8, 0] = 20.0
    k[:, :, 8:, 0] = 0.0
    # fp32 rounding of ~100-nat logits alone moves `out` by ~1e-5.
    check(q, k, v, 8, 20, None, mode, fp32_atol=1e-4)


@interp
@pytest.mark.parametrize("mode", MODES)
def test_sum_rule_and_determinism(mode, device):
    q, k, v, w = make_inputs(2, 3, 50, 16, torch.bfloat16, device, seed=4, weighted=True, text_len=20)
    out1, mass1 = acd_attention_triton(q, k, v, 20, 30, 0.25, w, mode=mode)
    out2, mass2 = acd_attention_triton(q, k, v, 20, 30, 0.25, w, mode=mode)
    assert torch.equal(out1, out2) and torch.equal(mass1, mass2)
    torch.testing.assert_close(mass1.sum(-1), w.sum(-1), atol=1e-5, rtol=1e-5)
    _, mass_unweighted = acd_attention_triton(q, k, v, 20, 30, 0.25, None, mode=mode)
    torch.testing.assert_close(mass_unweighted.sum(-1), torch.full_like(mass1[:, 0], 20.0), atol=1e-4, rtol=1e-5)


@interp
def test_sequence_major_layout_matches_contiguous(device):
    # Flux hands over q/k/v as [B, N, H, D].transpose(1, 2): the kernels take strides, no copy.
    q, k, v, w = make_inputs(1, 2, 45, 32, torch.float16, device, seed=5, weighted=True, text_len=9)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    out, mass = acd_attention_triton(q, k, v, 9, 30, 0.2, w)
    out_t, mass_t = acd_attention_triton(qt, kt, vt, 9, 30, 0.2, w)
    assert torch.equal(out, out_t) and torch.equal(mass, mass_t)


@pytest.mark.parametrize("head_dim", [48, 8, 512])
def test_unsupported_head_dim_raises(head_dim, device):
    q = torch.zeros(1, 1, 8, head_dim, device=device)
    with pytest.raises(ValueError, match=r"head_dim.*power of two in 16\.\.256") as info:
        acd_attention_triton(q, q, q, 2, 3, 0.1, None)
    assert f"head_dim={head_dim}" in str(info.value)
    assert 'backend="torch"' in str(info.value) and 'backend="cpp"' in str(info.value)


@interp
@pytest.mark.parametrize("mode", MODES)
def test_public_api_triton_backend(mode, device):
    q, k, v, w = make_inputs(2, 2, 30, 16, torch.float32, device, seed=6, weighted=True, text_len=6)
    out, mass = rcgrpo_kernels.acd_attention(q, k, v, 6, 17, text_weights=w, backend="triton", mode=mode)
    ref_out, ref_mass = reference(q, k, v, 6, 17, 16**-0.5, w, torch.float64)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        rcgrpo_kernels.acd_attention(q[..., :12], k[..., :12], v[..., :12], 6, 17, backend="triton")


# --------------------------------------------------------------------------------------------
# Real shapes (GPU only): FLUX.1-Kontext, 24 heads of 128, [512 text | target | context image].
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "seq,text_len,image_len",
    [(8704, 512, 4096), (2560, 512, 1024)],
    ids=["kontext-1024px", "kontext-512px"],
)
def test_kontext_shapes_bf16(seq, text_len, image_len, mode):
    q, k, v, w = make_inputs(1, 24, seq, 128, torch.bfloat16, "cuda", seed=7, weighted=True, text_len=text_len)
    check(q, k, v, text_len, image_len, w, mode, ref_dtype=torch.float32)
