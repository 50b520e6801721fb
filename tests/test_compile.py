"""torch.compile sees the ops.

- The custom op `rcgrpo::acd_attention` passes `torch.library.opcheck` (schema, fake/meta kernel,
  AOT dispatch) on every backend, with the strided layout and every mode, so its fake
  registration matches what the backends return (shape, dtype and strides of `out` and `mass`).
- The public wrapper compiles without graph breaks (fullgraph, mode="auto" default) and gives the
  eager results.
- A compiled transformer with the ACD processor gives the same rollout and mass.
"""
import pytest
import torch

import rcgrpo_kernels
from conftest import requires_backend

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpp", id="cpp", marks=requires_backend("cpp")),
    pytest.param("triton", id="triton", marks=[requires_backend("triton"), pytest.mark.slow]),
]


def _inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=g).to(device).transpose(1, 2) for _ in range(3))
    return q, k, v, torch.rand(1, 4, generator=g).to(device)


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("mode", ["auto", "fused", "sdpa"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_passes_opcheck(backend, mode):
    if backend != "triton" and mode == "sdpa":
        pytest.skip("mode only matters on the Triton backend")
    q, k, v, w = _inputs(_device(backend))
    torch.library.opcheck(torch.ops.rcgrpo.acd_attention.default, (q, k, v, 4, 10, 0.25, w, backend, mode))
    torch.library.opcheck(torch.ops.rcgrpo.acd_attention.default, (q.contiguous(), k, v, 4, 10, 0.25, None, backend, mode))


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_compiles_in_one_graph_with_the_default_mode(backend):
    q, k, v, w = _inputs(_device(backend))

    def f(q, k, v, w):
        out, mass = rcgrpo_kernels.acd_attention(q, k, v, 4, 10, text_weights=w, backend=backend)
        return out.transpose(1, 2).flatten(2), mass

    eager = f(q, k, v, w)  # (also probes the backends: compiled code reads the probes as constants)
    compiled = torch.compile(f, backend="eager", fullgraph=True)(q, k, v, w)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_compiled_transformer_inside_a_capture_matches_eager():
    rcgrpo = pytest.importorskip("rcgrpo")
    from rcgrpo.testing import TINY_TEXT_LEN, tiny_kontext_pipeline

    pipe = tiny_kontext_pipeline(0)
    recorder = rcgrpo.attach_acd(pipe.transformer, last_k=4, backend="torch")
    mask = torch.zeros(64)
    mask[10:20] = 1
    noises = rcgrpo.region_decoupled_noise((64, 16), mask[:, None], group_size=2,
                                           generator=torch.Generator().manual_seed(0))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    kwargs = dict(num_steps=2, guidance_scale=2.5, height=32, width=32, max_sequence_length=TINY_TEXT_LEN)
    with recorder.capture(mask) as cap:
        eager = rcgrpo.rollout(pipe, image, "make it red", noises, **kwargs)
    eager_mass = cap.mass.clone()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    with recorder.capture(mask) as cap:
        compiled = rcgrpo.rollout(pipe, image, "make it red", noises, **kwargs)
    torch.testing.assert_close(compiled.states, eager.states, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cap.mass, eager_mass, rtol=1e-6, atol=1e-7)
    assert cap.num_calls == 8
