"""Triton backend of `acd_attention` (kernels/rcgrpo_kernels/triton_acd_attention.py).

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set by conftest) with one
fixed 16×16 tile config, so the small odd shapes below exercise every masked tail (every GPU
autotune config is run in test_kernel_configs.py). The references are computed here, independently
of the package: float64 softmax attention (CPU) or float32 (GPU), and the text→image mass from the
materialized text×image weights.

Low-precision rule (flash-attention's): max error of `out` vs the reference ≤ 2 × the max error of
torch's own attention (F.scaled_dot_product_attention) in that dtype, + 1e-5. Under the interpreter
this holds for bf16 only because the kernel rounds fp32 → bf16 to nearest as a GPU does (the
interpreter truncates); `test_bf16_outputs_are_rounded_to_nearest` checks that directly.
The mass is fp32-accurate for every dtype. There is no run-to-run determinism test: the kernels
use no atomics (every output element is written by one program; the mass partials of the head
splits are summed by torch in a fixed order), so such a test could not fail.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from conftest import requires_backend, requires_cuda  # noqa: E402

import rcgrpo_kernels  # noqa: E402
from rcgrpo_kernels.triton_acd_attention import acd_attention_triton, mass_head_splits  # noqa: E402

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


def check(q, k, v, text_len, image_len, weights, mode, scale=None, ref_dtype=torch.float64, fp32_atol=1e-5, **kw):
    """Run the Triton backend and check out and mass against the references."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, mass = acd_attention_triton(q, k, v, text_len, image_len, scale, weights, mode=mode, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert mass.shape == (q.shape[0], image_len) and mass.dtype == torch.float32
    ref_out, ref_mass = reference(q, k, v, text_len, image_len, scale, weights, ref_dtype)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out.double(), atol=fp32_atol, rtol=1e-5)
    else:
        base_out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # torch in the same dtype
        err, base = max_err(out, ref_out), max_err(base_out, ref_out)
        assert err <= 2 * base + 1e-5, f"out error {err:.3g} > 2 × torch SDPA {q.dtype} error {base:.3g}"
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
def test_sum_rule_with_and_without_weights(mode, device):
    q, k, v, w = make_inputs(2, 3, 50, 16, torch.bfloat16, device, seed=4, weighted=True, text_len=20)
    _, mass = acd_attention_triton(q, k, v, 20, 30, 0.25, w, mode=mode)
    torch.testing.assert_close(mass.sum(-1), w.sum(-1), atol=1e-5, rtol=1e-5)
    _, mass_unweighted = acd_attention_triton(q, k, v, 20, 30, 0.25, None, mode=mode)
    torch.testing.assert_close(mass_unweighted.sum(-1), torch.full_like(mass[:, 0], 20.0), atol=1e-4, rtol=1e-5)
    # Weights scale each text row's contribution: doubling them doubles the mass.
    _, mass2 = acd_attention_triton(q, k, v, 20, 30, 0.25, 2 * w, mode=mode)
    torch.testing.assert_close(mass2, 2 * mass, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Mass kernel head splits
# --------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("heads", [5, 4])
def test_every_head_split_gives_the_reference_mass(heads, device):
    # Uneven runs (5 heads in 2 splits: 3 + 2; 3 splits: 2 + 2 + 1) and one head per split.
    q, k, v, w = make_inputs(1, heads, 45, 16, torch.float32, device, seed=8, weighted=True, text_len=11)
    _, ref_mass = reference(q, k, v, 11, 23, 0.3, w, torch.float64)
    outs = []
    for splits in range(1, heads + 1):
        out, mass = acd_attention_triton(q, k, v, 11, 23, 0.3, w, mode="sdpa", head_splits=splits)
        torch.testing.assert_close(mass.double(), ref_mass, atol=1e-6, rtol=1e-5, msg=f"{splits} splits")
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # out does not depend on the mass split
    with pytest.raises(ValueError, match="head_splits must be in 1..H"):
        acd_attention_triton(q, k, v, 11, 23, 0.3, w, head_splits=heads + 1)


def test_head_split_heuristic_fills_the_gpu():
    # Kontext 1024 px on an H100 (132 SMs): 64 image tiles alone would leave half the SMs idle.
    splits = mass_head_splits(batch=1, heads=24, image_len=4096, sm_count=132)
    per = -(-24 // splits)
    assert 64 * splits >= 2 * 132 and -(-24 // per) == splits  # >= 2 programs per SM, no empty split
    assert splits < 24  # several heads per program amortize the K tile loads
    assert mass_head_splits(batch=8, heads=24, image_len=4096, sm_count=132) == 1  # B=8 fills it
    assert mass_head_splits(batch=1, heads=3, image_len=64, sm_count=132) == 3  # at most one per head
    for heads in range(1, 30):
        for sms in (1, 8, 132):
            s = mass_head_splits(batch=1, heads=heads, image_len=1024, sm_count=sms)
            per = -(-heads // s)
            assert 1 <= s <= heads and (s - 1) * per < heads <= s * per  # every split has heads


@interp
def test_default_head_splits_are_used_under_the_interpreter(device):
    # The interpreter pretends to have 2 SMs: 1 image tile × B=1 wants 4 programs → 3 heads split in 3.
    from rcgrpo_kernels import triton_acd_attention as tri

    q, k, v, _ = make_inputs(1, 3, 30, 16, torch.float32, device, seed=9, text_len=5)
    if not q.is_cuda:
        assert tri._default_head_splits(q, 20) == 3
    check(q, k, v, 5, 20, None, "fused")


# --------------------------------------------------------------------------------------------
# Layouts, head dims, bf16 rounding
# --------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("mode", MODES)
def test_sequence_major_layout_matches_contiguous(mode, device):
    # Flux hands over q/k/v as [B, N, H, D].transpose(1, 2): the kernels take strides, no copy,
    # and write out in the same layout.
    q, k, v, w = make_inputs(1, 2, 45, 32, torch.float16, device, seed=5, weighted=True, text_len=9)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    out, mass = acd_attention_triton(q, k, v, 9, 30, 0.2, w, mode=mode)
    out_t, mass_t = acd_attention_triton(qt, kt, vt, 9, 30, 0.2, w, mode=mode)
    assert torch.equal(out, out_t) and torch.equal(mass, mass_t)
    if mode == "fused":
        assert out_t.stride() == qt.stride()


@interp
@pytest.mark.parametrize("head_dim,dtype", [(1, torch.float32), (8, torch.float32), (20, torch.float16),
                                            (48, torch.bfloat16), (100, torch.float32), (200, torch.float16)])
@pytest.mark.parametrize("mode", MODES)
def test_any_head_dim_up_to_256(head_dim, dtype, mode, device):
    q, k, v, w = make_inputs(1, 2, 37, head_dim, dtype, device, seed=10, weighted=True, text_len=7)
    check(q, k, v, 7, 21, w, mode)


@interp
@pytest.mark.parametrize("mode", MODES)
def test_head_dim_padding_is_exact(mode, device):
    # D=48 runs as HEAD_DIM=64 with masked loads: the same bits as inputs zero-padded to 64 by hand.
    q, k, v, w = make_inputs(2, 2, 40, 48, torch.float32, device, seed=11, weighted=True, text_len=9)
    out, mass = acd_attention_triton(q, k, v, 9, 20, 48**-0.5, w, mode=mode)
    qp, kp, vp = (F.pad(t, (0, 16)) for t in (q, k, v))
    out_p, mass_p = acd_attention_triton(qp, kp, vp, 9, 20, 48**-0.5, w, mode=mode)
    assert torch.equal(mass, mass_p)
    if mode == "fused":
        assert torch.equal(out, out_p[..., :48]) and not out_p[..., 48:].any()


@pytest.mark.parametrize("head_dim", [257, 512])
def test_head_dim_above_256_raises(head_dim, device):
    q = torch.zeros(1, 1, 8, head_dim, device=device)
    with pytest.raises(ValueError, match=r"Triton backend takes head_dim up to 256") as info:
        acd_attention_triton(q, q, q, 2, 3, 0.1, None)
    assert f"head_dim={head_dim}" in str(info.value)
    assert 'backend="torch"' in str(info.value) and 'backend="cpp"' in str(info.value)


@interp
def test_bf16_outputs_are_rounded_to_nearest(device):
    """A GPU rounds the fp32 accumulator (and the probabilities) to the nearest bf16; the
    interpreter truncates, which biases |out| down by half an ulp on average. With the kernel's
    rounding the signed error relative to the float64 result is unbiased."""
    q, k, v, _ = make_inputs(1, 2, 64, 32, torch.bfloat16, device, seed=12, text_len=8)
    out, _ = acd_attention_triton(q, k, v, 8, 40, 32**-0.5, None, mode="fused")
    ref, _ = reference(q, k, v, 8, 40, 32**-0.5, None, torch.float64)
    ulp = ref.abs().clamp_min(1e-3) * torch.finfo(torch.bfloat16).eps  # spacing 2^-7 relative, upper bound
    bias = ((out.double() - ref) * ref.sign() / ulp).mean().item()
    assert abs(bias) < 0.1, f"mean signed error {bias:.3f} ulp: bf16 stores are not rounded to nearest"


@interp
@pytest.mark.parametrize("mode", MODES)
def test_public_api_triton_backend(mode, device):
    q, k, v, w = make_inputs(2, 2, 30, 16, torch.float32, device, seed=6, weighted=True, text_len=6)
    out, mass = rcgrpo_kernels.acd_attention(q, k, v, 6, 17, text_weights=w, backend="triton", mode=mode)
    ref_out, ref_mass = reference(q, k, v, 6, 17, 16**-0.5, w, torch.float64)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.double(), ref_mass, atol=1e-5, rtol=1e-5)
    # A head dim that is not a power of two runs on Triton (padded), without any fallback warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out12, mass12 = rcgrpo_kernels.acd_attention(q[..., :12], k[..., :12], v[..., :12], 6, 17, backend="triton")
    ref12, _ = reference(q[..., :12], k[..., :12], v[..., :12], 6, 17, 12**-0.5, None, torch.float64)
    torch.testing.assert_close(out12.double(), ref12, atol=1e-5, rtol=1e-5)
    big = torch.zeros(1, 1, 8, 300, device=device)
    with pytest.raises(ValueError, match="head_dim"):
        rcgrpo_kernels.acd_attention(big, big, big, 2, 3, backend="triton")


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
