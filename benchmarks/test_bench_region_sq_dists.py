"""region_sq_dists providers, one benchmark group per (mode, shape); modes "fwd" and "fwd+bwd".

Providers:
    copy       a device copy of as many bytes as the op must move (CUDA only): the bandwidth reference;
               the other providers get `fraction_of_copy_bw` (the GPU target: fwd+bwd >= 70%)
    eager      ((x[:,None] - y[:,:,None])**2 * m).sum(-1) for in and out: builds [T, K, G, D]
    triton     rcgrpo_kernels.region_sq_dists(backend="triton")  (CUDA tensors)
    cpp        rcgrpo_kernels.region_sq_dists(backend="cpp")     (CPU tensors)
    torch_ref  rcgrpo_kernels.region_sq_dists(backend="torch")   (loop over anchors)
"fwd+bwd" runs the forward and torch.autograd.grad for x and y with a fixed upstream gradient.
extra_info: GB/s (region_sq_dists_bytes / median: the bytes the op must move at minimum),
peak_mem_mb, speed-up vs eager/torch_ref of the same run, NVML telemetry on CUDA.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import providers
import telemetry
from providers import DIST_MODES, DIST_PROVIDERS, DIST_SHAPES, DistShape

DEVICE = providers.bench_device()
SHAPES = DIST_SHAPES[providers.shape_set(DEVICE)]
CASES = [(shape, mode, provider) for shape in SHAPES for mode in DIST_MODES for provider in DIST_PROVIDERS]


@pytest.mark.parametrize("shape,mode,provider", CASES, ids=[f"{s.id}-{m}-{p}" for s, m, p in CASES])
def test_region_sq_dists(benchmark, bench_session, bench_device, shape: DistShape, mode: str, provider: str):
    from rcgrpo_kernels import region_sq_dists_bytes

    reason = providers.dists_skip_reason(provider, shape, mode, bench_device)
    if reason:
        pytest.skip(reason)
    benchmark.group = shape.group(mode)
    inputs = providers.make_dists_inputs(shape, mode, bench_device)
    fn = providers.dists_callable(provider, mode, inputs)
    with telemetry.NvmlSampler(bench_device) as nvml:
        median = providers.run_benchmark(benchmark, fn, bench_device)
    runnable = [p for p in DIST_PROVIDERS if providers.dists_skip_reason(p, shape, mode, bench_device) is None]
    extra = {"op": "region_sq_dists", "mode": mode, "shape": dataclasses.asdict(shape)}
    extra.update(bench_session.peak_memory(fn, op="dists", shape=shape, mode=mode, providers_in_group=runnable,
                                           provider=provider))
    itemsize = torch.empty((), dtype=providers.dtype_of(shape.dtype)).element_size()
    moved = region_sq_dists_bytes(shape.steps, shape.group_size, shape.anchors, shape.dim, itemsize,
                                  backward=(mode == "fwd+bwd"))
    extra["bytes"] = moved
    if median:
        extra["gbps"] = moved / median / 1e9
        copy_median = bench_session.medians.get(benchmark.group, {}).get("copy")
        if copy_median and provider != "copy":
            extra["fraction_of_copy_bw"] = copy_median / median  # same bytes: time ratio
    extra["telemetry"] = nvml.summary()
    bench_session.finish(benchmark, provider, median, extra)


def test_providers_agree_at_a_small_shape(bench_device):
    """Forward and gradients of every runnable provider match the torch reference."""
    shape = DistShape("small-check", 3, 2, 5, 64 * 37, "float32")
    ref = None
    checked = []
    for provider in ["torch_ref"] + [p for p in DIST_PROVIDERS if p not in ("torch_ref", "copy")]:
        if providers.dists_skip_reason(provider, shape, "fwd+bwd", bench_device):
            continue
        inputs = providers.make_dists_inputs(shape, "fwd+bwd", bench_device, seed=2)
        with torch.no_grad():
            s = providers.dists_callable(provider, "fwd", inputs)()
        dx, dy = providers.dists_callable(provider, "fwd+bwd", inputs)()
        if ref is None:
            ref = (s, dx, dy)
            continue
        for name, got, want in zip(("S", "dx", "dy"), (s, dx, dy), ref):
            torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=1e-4, msg=f"{provider}: {name}")
        checked.append(provider)
    assert checked, "no provider besides torch_ref can run here"
