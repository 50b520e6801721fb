"""Dispatch of `acd_attention`: mode="auto", the SDPA backend priority of mode="sdpa", and the
fallbacks of backend="auto" (each warns once and is listed by `python -m rcgrpo_kernels`)."""
import importlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import rcgrpo_kernels
from rcgrpo_kernels import _backends, _sdpa
from rcgrpo_kernels._backends import FallbackWarning

# The module (the package attribute of that name is the op itself).
acd_module = importlib.import_module("rcgrpo_kernels.acd_attention")

triton = pytest.importorskip("triton")
from rcgrpo_kernels import triton_acd_attention as tri  # noqa: E402


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget the fallback warnings issued so far, so that this test sees its own first warning."""
    monkeypatch.setattr(_backends, "_WARNED", {})


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def test_auto_is_the_default_and_resolves_to_the_named_constant(monkeypatch):
    import inspect

    assert inspect.signature(rcgrpo_kernels.acd_attention).parameters["mode"].default == "auto"
    assert acd_module.TRITON_AUTO_MODE in ("fused", "sdpa")
    for constant in ("fused", "sdpa"):
        monkeypatch.setattr(acd_module, "TRITON_AUTO_MODE", constant)
        assert acd_module.resolve_mode("auto") == constant
        assert acd_module.resolve_mode("fused") == "fused" and acd_module.resolve_mode("sdpa") == "sdpa"


@pytest.mark.parametrize("constant", ["fused", "sdpa"])
def test_triton_backend_runs_the_mode_auto_resolves_to(constant, monkeypatch):
    seen = []
    real = tri.acd_attention_triton

    def spy(*args, mode, **kwargs):
        seen.append(mode)
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(acd_module, "TRITON_AUTO_MODE", constant)
    monkeypatch.setattr(tri, "acd_attention_triton", spy)
    monkeypatch.setattr(acd_module, "resolve_backend", lambda backend, device, op: "triton")
    if _backends.backend_unavailable_reason("triton", torch.device("cpu")) is not None:
        pytest.skip("the Triton interpreter is not enabled")
    q, k, v = _qkv((1, 2, 24, 16))
    out, mass = rcgrpo_kernels.acd_attention(q, k, v, 4, 12)  # mode="auto"
    assert seen == [constant]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.full((1,), 4.0), atol=1e-5, rtol=1e-5)


def test_sdpa_mode_runs_sdpa_under_the_cudnn_first_priority(monkeypatch):
    """Inside the sdpa path, torch's SDPA flags and priority order are cuDNN > Flash > efficient > math."""
    from torch.nn.attention import SDPBackend

    recorded = {}
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        recorded["order"] = list(torch._C._get_sdp_priority_order())
        recorded["enabled"] = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
                               torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v = _qkv((1, 2, 20, 16))
    before = list(torch._C._get_sdp_priority_order())
    out = _sdpa.sdpa_prioritized(q, k, v, scale=0.3)
    torch.testing.assert_close(out, real(q, k, v, scale=0.3))
    want = [int(getattr(SDPBackend, name).value) for name in _sdpa.SDPA_PRIORITY]
    assert recorded["enabled"] == (True, True, True, True)
    if _sdpa.sdpa_set_priority_supported():
        assert recorded["order"][: len(want)] == want
    assert list(torch._C._get_sdp_priority_order()) == before  # restored on exit


def test_sdpa_priority_without_set_priority_falls_back_to_the_allowed_set(monkeypatch):
    calls = []

    def old_sdpa_kernel(backends):  # the signature of torch < 2.6
        calls.append(list(backends))
        import contextlib

        return contextlib.nullcontext()

    import torch.nn.attention as attention

    monkeypatch.setattr(attention, "sdpa_kernel", old_sdpa_kernel)
    _sdpa.sdpa_set_priority_supported.cache_clear()
    try:
        assert not _sdpa.sdpa_set_priority_supported()
        q, k, v = _qkv((1, 1, 8, 16))
        _sdpa.sdpa_prioritized(q, k, v)
    finally:
        monkeypatch.undo()
        _sdpa.sdpa_set_priority_supported.cache_clear()
    assert [b.name for b in calls[0]] == list(_sdpa.SDPA_PRIORITY)


def test_sdpa_backend_name_follows_the_allowed_backends():
    q, k, v = _qkv((1, 2, 16, 16))
    with _sdpa.sdpa_priority(("MATH",)):
        assert _sdpa.sdpa_backend_name(q, k, v) == "MATH"
    assert _sdpa.sdpa_backend_name(q, k, v) in ("FLASH_ATTENTION", "MATH", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def test_head_dim_above_256_falls_back_once_with_a_warning(monkeypatch, fresh_warnings):
    # As on a CUDA machine: backend="auto" resolves to Triton.
    monkeypatch.setattr(acd_module, "resolve_backend", lambda backend, device, op: "triton" if backend == "auto" else backend)
    q, k, v = _qkv((1, 1, 6, 260))
    with pytest.warns(FallbackWarning, match=r"head_dim=260 > 256 .* torch reference"):
        out, mass = rcgrpo_kernels.acd_attention(q, k, v, 2, 3)
    ref_out, ref_mass = rcgrpo_kernels.acd_attention(q, k, v, 2, 3, backend="torch")
    assert torch.equal(out, ref_out) and torch.equal(mass, ref_mass)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per reason: the second call is silent
        rcgrpo_kernels.acd_attention(q, k, v, 2, 3)
    assert any("head_dim=260" in m for m in _backends.fallbacks_seen().values())


def test_cuda_tensors_without_triton_warn_once(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_backends, "_triton_import_error", lambda: "triton does not import (simulated)")
    with pytest.warns(FallbackWarning, match=r"CUDA tensors use the slow torch reference backend: triton does not import \(simulated\)"):
        assert _backends.resolve_backend("auto", torch.device("cuda"), "op") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.resolve_backend("auto", torch.device("cuda"), "op") == "torch"
    assert any("simulated" in note for note in _backends.auto_fallbacks())


def test_cpu_tensors_without_the_extension_warn_once(monkeypatch, fresh_warnings):
    monkeypatch.setattr(_backends, "_cpp_import_error", lambda: "not built (simulated)")
    with pytest.warns(FallbackWarning, match=r"CPU tensors use the slower torch reference backend"):
        assert _backends.resolve_backend("auto", torch.device("cpu"), "op") == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _backends.resolve_backend("auto", torch.device("cpu"), "op")


def test_usual_paths_do_not_warn(fresh_warnings):
    q, k, v = _qkv((1, 2, 20, 12))  # not a power of two: still no fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rcgrpo_kernels.acd_attention(q, k, v, 4, 10)
    assert _backends.fallbacks_seen() == {} or _backends._cpp_import_error() is not None


def test_module_main_reports_modes_isa_and_fallbacks():
    proc = subprocess.run([sys.executable, "-m", "rcgrpo_kernels"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert f"-> {acd_module.TRITON_AUTO_MODE!r} (an estimate" in text
    assert "CUDNN_ATTENTION > FLASH_ATTENTION > EFFICIENT_ATTENTION > MATH" in text
    assert "head_dim > 256 -> torch reference" in text
    if _backends._cpp_import_error() is None:
        assert "C++ kernels ISA:" in text
