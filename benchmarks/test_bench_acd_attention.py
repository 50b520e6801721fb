"""acd_attention providers, one benchmark group per shape (forward only, as the op is used).

Providers:
    sdpa              F.scaled_dot_product_attention (torch's default backend choice), no ACD mass: the floor
    sdpa_cudnn        the same forced to cuDNN (sdpa_kernel([CUDNN_ATTENTION])), no ACD mass (CUDA only)
    eager             materialized softmax weights → @v, mass read from the logits (attention-map tools)
    triton_fused      rcgrpo_kernels.acd_attention(backend="triton", mode="fused")
    triton_sdpa_mass  rcgrpo_kernels.acd_attention(backend="triton", mode="sdpa") (SDPA cuDNN-first + mass kernels)
    auto              rcgrpo_kernels.acd_attention(q, k, v, ...) with the defaults (backend and mode "auto"),
                      what the ACD processor runs by default (CUDA; on CPU it would repeat `cpp`)
    cpp               rcgrpo_kernels.acd_attention(backend="cpp")   (CPU tensors)
    torch_ref         rcgrpo_kernels.acd_attention(backend="torch") (blocked fp32 reference)
extra_info: TFLOP/s (attention_flops / median), peak_mem_mb, speed-up vs sdpa/sdpa_cudnn/eager of the
same run, NVML telemetry on CUDA; for the providers that run SDPA, which SDPA backend ran
(`sdpa_backend`, `sdpa_backends_runnable`, on CUDA `sdpa_cuda_kernels`; see providers.sdpa_backend_info).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import providers
import telemetry
from providers import ATTN_PROVIDERS, ATTN_SHAPES, AttnShape

DEVICE = providers.bench_device()
SHAPES = ATTN_SHAPES[providers.shape_set(DEVICE)]
# Baselines first within each shape, so later providers see their medians (ratios of the same run).
CASES = [(shape, provider) for shape in SHAPES for provider in ATTN_PROVIDERS]


@pytest.mark.parametrize("shape,provider", CASES, ids=[f"{s.id}-{p}" for s, p in CASES])
def test_acd_attention(benchmark, bench_session, bench_device, shape: AttnShape, provider: str):
    from rcgrpo_kernels import attention_flops

    reason = providers.attention_skip_reason(provider, shape, bench_device)
    if reason:
        pytest.skip(reason)
    benchmark.group = shape.group
    inputs = providers.make_attention_inputs(shape, bench_device)
    fn = providers.attention_callable(provider, inputs)
    with telemetry.NvmlSampler(bench_device) as nvml:
        median = providers.run_benchmark(benchmark, fn, bench_device)
    runnable = [p for p in ATTN_PROVIDERS if providers.attention_skip_reason(p, shape, bench_device) is None]
    extra = {"op": "acd_attention", "shape": dataclasses.asdict(shape)}
    extra.update(bench_session.peak_memory(fn, op="attention", shape=shape, providers_in_group=runnable,
                                           provider=provider))
    flops = attention_flops(shape.batch, shape.heads, shape.seq, shape.head_dim)
    extra["flops"] = flops
    if median:
        extra["tflops"] = flops / median / 1e12
    extra["telemetry"] = nvml.summary()
    if provider in providers.SDPA_PROVIDERS:
        extra.update(providers.sdpa_backend_info(provider, inputs, fn))
    bench_session.finish(benchmark, provider, median, extra)


SMALL = AttnShape("small-check", 1, 2, 320, 64, 48, 160, "float32")


def test_providers_agree_at_a_small_shape(bench_device):
    """The timed providers compute the same out and mass (guards against timing the wrong thing)."""
    shape = SMALL if bench_device.type == "cpu" else dataclasses.replace(SMALL, dtype="bfloat16")
    inputs = providers.make_attention_inputs(shape, bench_device, seed=1)
    ref_out, ref_mass = providers.attention_callable("torch_ref", inputs)()
    tol = dict(atol=2e-4, rtol=2e-4) if shape.dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    checked = []
    for provider in ATTN_PROVIDERS:
        if provider == "torch_ref" or providers.attention_skip_reason(provider, shape, bench_device):
            continue
        result = providers.attention_callable(provider, inputs)()
        out, mass = (result, None) if provider in ("sdpa", "sdpa_cudnn") else result
        torch.testing.assert_close(out.float(), ref_out.float(), **tol, msg=f"{provider}: out")
        if mass is not None:
            torch.testing.assert_close(mass, ref_mass, **tol, msg=f"{provider}: mass")
        checked.append(provider)
    assert checked, "no provider besides torch_ref can run here"
