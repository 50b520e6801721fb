"""The layout diffusers produces, on every backend: q, k, v as `[B, N, H, D].transpose(1, 2)`.

Flux's processors build q, k, v as `[B, N, H, D]` and hand SDPA their `transpose(1, 2)`: strides
(N·H·D, D, H·D, 1), unit stride in D but not contiguous. `acd_attention` takes that layout on
every backend without a `.contiguous()` copy (the C++ backend copies only to convert fp16/bf16 to
fp32), returns `out` in the same layout (so the processor's `out.transpose(1, 2).flatten(2)` is a
view), and gives the same results as for contiguous inputs: bit for bit on the Triton and C++
backends (the same arithmetic through other addresses), to fp32 rounding on the torch reference
(whose matmuls may pick other BLAS paths for other strides).
"""
import contextlib

import pytest
import torch

from conftest import requires_backend
from rcgrpo_kernels import acd_attention, region_sq_dists

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpp", id="cpp", marks=requires_backend("cpp")),
    pytest.param("triton", id="triton", marks=[requires_backend("triton"), pytest.mark.slow]),
]
BITWISE = ("cpp", "triton")


def _device(backend):
    return torch.device("cuda") if backend == "triton" and torch.cuda.is_available() else torch.device("cpu")


def _sequence_major(shape, dtype, device, seed):
    """q, k, v `[B, H, N, D]` as views of contiguous `[B, N, H, D]` tensors, and w `[B, T]`."""
    b, h, n, d = shape
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2) for _ in range(3)]
    return qkv


@contextlib.contextmanager
def count_contiguous_copies():
    """Counts `.contiguous()` calls that copy (on tensors that are not contiguous)."""
    copies = []
    original = torch.Tensor.contiguous

    def spy(self, *args, **kwargs):
        if not self.is_contiguous(*args, **kwargs):
            copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    torch.Tensor.contiguous = spy
    try:
        yield copies
    finally:
        torch.Tensor.contiguous = original


@pytest.mark.parametrize("mode", ["fused", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_major_layout_without_copies(backend, dtype, mode):
    if backend != "triton" and mode == "sdpa":
        pytest.skip("mode only matters on the Triton backend")
    device = _device(backend)
    shape, text_len, image_len = (2, 3, 53, 24), 11, 25  # D=24 is padded to 32 on Triton
    q, k, v = _sequence_major(shape, dtype, device, seed=1)
    assert not q.is_contiguous() and q.stride(-1) == 1
    w = torch.rand(2, text_len, generator=torch.Generator().manual_seed(2)).to(device)
    with count_contiguous_copies() as copies:
        out, mass = acd_attention(q, k, v, text_len, image_len, text_weights=w, backend=backend, mode=mode)
    assert copies == [], f"{backend}: .contiguous() copied inputs of shapes {copies}"
    assert out.stride() == q.stride(), "out must have q's layout"
    assert out.transpose(1, 2).is_contiguous()  # the processor's flatten(2) is a view

    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    out_c, mass_c = acd_attention(qc, kc, vc, text_len, image_len, text_weights=w, backend=backend, mode=mode)
    if backend in BITWISE:
        assert torch.equal(out, out_c) and torch.equal(mass, mass_c)
    else:
        torch.testing.assert_close(out, out_c, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)
        torch.testing.assert_close(mass, mass_c, rtol=1e-6, atol=1e-7)
    # and right: against float64 attention and the materialized mass
    qd, kd, vd = (t.double() for t in (q, k, v))
    logits = qd @ kd.transpose(-1, -2) * 24**-0.5
    torch.testing.assert_close(out.double(), torch.softmax(logits, -1) @ vd,
                               **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)))
    a = torch.softmax(logits[:, :, :text_len, text_len : text_len + image_len], -1) * w.double()[:, None, :, None]
    torch.testing.assert_close(mass.double(), a.sum(2).mean(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_sq_dists_strided_inputs(backend):
    """x, y with padded rows (slices of wider buffers): S and the gradients as for contiguous inputs.
    (The C++ backend makes such x, y contiguous first: the trainer's states are contiguous.)"""
    device = _device(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 309, generator=g).to(device)[..., :300].requires_grad_()
    y = torch.randn(2, 3, 305, generator=g).to(device)[..., 5:].requires_grad_()
    mask = torch.rand(300, generator=g).to(device)
    assert not x.is_contiguous() and not y.is_contiguous()
    xc, yc = (t.detach().contiguous().requires_grad_() for t in (x, y))
    s = region_sq_dists(x, y, mask, backend=backend)
    s_c = region_sq_dists(xc, yc, mask, backend=backend)
    torch.testing.assert_close(s, s_c, rtol=1e-6, atol=1e-6)
    grad = torch.randn(s.shape, generator=g).to(device)
    dx, dy = torch.autograd.grad((s * grad).sum(), (x, y))
    dx_c, dy_c = torch.autograd.grad((s_c * grad).sum(), (xc, yc))
    torch.testing.assert_close(dx, dx_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dy, dy_c, rtol=1e-6, atol=1e-6)
    diff = x.detach().double()[:, None] - y.detach().double()[:, :, None]
    torch.testing.assert_close(s[..., 0].double(), (diff**2 * mask.double()).sum(-1), rtol=1e-5, atol=1e-5)
