"""pytest set-up of the benchmark suites (`pytest benchmarks/`; pyproject's testpaths is tests/ only).

- The device is CUDA when present (GPU shapes), else CPU (CPU shapes); see providers.bench_device.
- TRITON_INTERPRET is NOT set: on CPU the Triton providers are skipped with a reason, because the
  interpreter is a correctness path, not a performance path.
- Session store of each group's medians, so every provider's extra_info carries its speed-up over
  the baselines ("sdpa", "eager", "torch_ref") measured in the same run.
- Versions, device facts and skip reasons are added to the --benchmark-json output.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import providers  # noqa: E402
import telemetry  # noqa: E402

BASELINES = ("sdpa", "sdpa_cudnn", "eager", "torch_ref")
_SKIPPED: list[dict] = []
_START: dict = {}
_FAILED: list[dict] = []


def pytest_report_header(config):
    device = providers.bench_device()
    return [f"rcgrpo benchmarks: device {device}, shapes '{providers.shape_set(device)}', "
            f"timing {providers.timing_knobs(device)}"]


def pytest_sessionstart(session):
    _START.update(telemetry.cpu_state(), time=telemetry.now_iso())


def pytest_runtest_logreport(report):
    if report.skipped and isinstance(report.longrepr, tuple):
        _SKIPPED.append({"test": report.nodeid, "reason": str(report.longrepr[2]).removeprefix("Skipped: ")})
    elif report.failed:
        message = getattr(report.longrepr, "reprcrash", None)
        _FAILED.append({"test": report.nodeid, "when": report.when,
                        "error": message.message if message is not None else str(report.longrepr)[-500:]})


def pytest_benchmark_update_machine_info(config, machine_info):
    device = providers.bench_device()
    machine_info["rcgrpo"] = {
        "versions": telemetry.versions(),
        "device": telemetry.device_info(device),
        "cpu_state_at_start": dict(_START) or telemetry.cpu_state(),
        "gpu": telemetry.static_gpu_info(device),
        "shape_set": providers.shape_set(device),
        "timing": providers.timing_knobs(device),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["rcgrpo"] = {
        "skipped": list(_SKIPPED),
        "failed": list(_FAILED),
        "cpu_state_at_end": telemetry.cpu_state(),
        "finished": telemetry.now_iso(),
    }


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return providers.bench_device()


class BenchSession:
    """Medians per group, the CPU memory-probe cache, and the extra_info every benchmark gets."""

    def __init__(self, device: torch.device):
        self.device = device
        self.medians: dict[str, dict[str, float]] = {}
        self._probes: dict[tuple, dict] = {}

    def peak_memory(self, fn, *, op: str, shape, providers_in_group: list[str], provider: str,
                    mode: str | None = None) -> dict:
        """{"peak_mem_mb": float | None, "peak_mem_method": str, ["peak_mem_error": str]}."""
        if self.device.type == "cuda":
            return {"peak_mem_mb": providers.cuda_peak_mb(fn, self.device),
                    "peak_mem_method": providers.CUDA_MEM_METHOD}
        key = (op, shape.label, mode)
        if key not in self._probes:
            self._probes[key] = providers.probe_cpu_peak_mb(op, shape, providers_in_group, mode=mode)
        found = self._probes[key].get(provider)
        if found is None:  # not in the first probe (should not happen): probe alone
            found = providers.probe_cpu_peak_mb(op, shape, [provider], mode=mode).get(provider, {})
        if "error" in found:
            return {"peak_mem_mb": None, "peak_mem_method": providers.CPU_MEM_METHOD, "peak_mem_error": found["error"]}
        return {"peak_mem_mb": found["peak_mem_mb"], "peak_mem_method": f"{providers.CPU_MEM_METHOD}; {found['method']}"}

    def finish(self, benchmark, provider: str, median: float | None, extra: dict) -> None:
        """Fill extra_info; speed-up vs each baseline already measured in this group (same run)."""
        group = benchmark.group
        info = benchmark.extra_info
        info["provider"] = provider
        info.update(extra)
        if self.device.type == "cpu":
            info["cpu_state"] = telemetry.cpu_state()
        if median is None:
            return
        info["median_s"] = median
        medians = self.medians.setdefault(group, {})
        medians[provider] = median
        for base in BASELINES:
            if base in medians and base != provider:
                info[f"speedup_vs_{base}"] = medians[base] / median


@pytest.fixture(scope="session")
def bench_session(bench_device) -> BenchSession:
    return BenchSession(bench_device)


@pytest.fixture(autouse=True)
def _release_cuda_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
