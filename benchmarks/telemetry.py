"""NVML telemetry (pynvml from nvidia-ml-py) and version/machine facts for the benchmark JSON.

`NvmlSampler` samples clocks, power, temperature, utilization and memory in a background thread
while a benchmark runs; on a machine without NVML (or without CUDA tensors) it is a no-op whose
`summary()` says why.
"""
from __future__ import annotations

import os
import platform
import threading
import time

import torch


def _nvml():
    try:
        import pynvml
    except Exception as exc:  # noqa: BLE001
        return None, f"pynvml (nvidia-ml-py) does not import: {type(exc).__name__}: {exc}"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"
    return pynvml, None


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _safe(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a field the driver does not expose
        return None


def _nvml_handle(pynvml, device: torch.device):
    """NVML handle of the torch device (by PCI bus id, so CUDA_VISIBLE_DEVICES is respected)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        props = torch.cuda.get_device_properties(index)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    except Exception:  # noqa: BLE001
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def static_gpu_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"available": False, "note": "no CUDA device: NVML telemetry is not recorded on CPU runs"}
    pynvml, err = _nvml()
    if pynvml is None:
        return {"available": False, "note": err}
    h = _nvml_handle(pynvml, device)
    mem = _safe(pynvml.nvmlDeviceGetMemoryInfo, h)
    return {
        "available": True,
        "name": _text(_safe(pynvml.nvmlDeviceGetName, h)),
        "driver": _text(_safe(pynvml.nvmlSystemGetDriverVersion)),
        "cuda_driver": _safe(pynvml.nvmlSystemGetCudaDriverVersion),
        "memory_total_mb": None if mem is None else mem.total / 2**20,
        "sm_clock_max_mhz": _safe(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_SM),
        "mem_clock_max_mhz": _safe(pynvml.nvmlDeviceGetMaxClockInfo, h, pynvml.NVML_CLOCK_MEM),
        "power_limit_w": _scale(_safe(pynvml.nvmlDeviceGetEnforcedPowerLimit, h), 1e-3),
        "persistence_mode": _safe(pynvml.nvmlDeviceGetPersistenceMode, h),
    }


def _scale(value, factor):
    return None if value is None else value * factor


def _sample(pynvml, h) -> dict:
    util = _safe(pynvml.nvmlDeviceGetUtilizationRates, h)
    mem = _safe(pynvml.nvmlDeviceGetMemoryInfo, h)
    return {
        "sm_clock_mhz": _safe(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
        "mem_clock_mhz": _safe(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
        "power_w": _scale(_safe(pynvml.nvmlDeviceGetPowerUsage, h), 1e-3),
        "temperature_c": _safe(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
        "util_gpu_pct": None if util is None else util.gpu,
        "util_mem_pct": None if util is None else util.memory,
        "memory_used_mb": None if mem is None else mem.used / 2**20,
        "throttle_reasons": _safe(_throttle_fn(pynvml), h),
    }


def _throttle_fn(pynvml):
    fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    return fn or getattr(pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", lambda _h: None)


class NvmlSampler:
    """Context manager: samples NVML every `interval` s on a thread; `summary()` → dict for extra_info."""

    def __init__(self, device: torch.device, interval: float = 0.05):
        self.device = device
        self.interval = interval
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = None
        self._pynvml = None
        self._handle = None
        self.note = None
        if device.type != "cuda":
            self.note = "no CUDA device: NVML telemetry is a no-op on CPU runs"
            return
        self._pynvml, self.note = _nvml()
        if self._pynvml is not None:
            try:
                self._handle = _nvml_handle(self._pynvml, device)
            except Exception as exc:  # noqa: BLE001
                self._pynvml, self.note = None, f"no NVML handle for {device}: {exc}"

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(_sample(self._pynvml, self._handle))
            self._stop.wait(self.interval)

    def __enter__(self):
        if self._pynvml is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self.samples.append(_sample(self._pynvml, self._handle))
        return False

    def summary(self) -> dict:
        if self._pynvml is None:
            return {"available": False, "note": self.note}
        out = dict(static_gpu_info(self.device))
        out["samples"] = len(self.samples)
        keys = [k for k in self.samples[0] if k != "throttle_reasons"] if self.samples else []
        for key in keys:
            values = [s[key] for s in self.samples if s.get(key) is not None]
            if values:
                out[f"{key}_mean"] = sum(values) / len(values)
                out[f"{key}_max"] = max(values)
        reasons = 0
        for s in self.samples:
            reasons |= s.get("throttle_reasons") or 0
        out["throttle_reasons_or"] = reasons
        return out


def cpu_state() -> dict:
    """Load average and core count: the CPU machine is shared, so runs are noisy."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"loadavg_1_5_15": load, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for name in ("triton", "diffusers", "transformers", "peft", "accelerate", "pytest_benchmark"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "unknown")
        except Exception:  # noqa: BLE001
            info[name] = None
    try:
        import rcgrpo_kernels

        info["rcgrpo_kernels_backends"] = rcgrpo_kernels.available_backends()
    except Exception as exc:  # noqa: BLE001
        info["rcgrpo_kernels_backends"] = f"import failed: {exc}"
    return info


def device_info(device: torch.device) -> dict:
    info = {"bench_device": str(device), "cpu_model": _cpu_model()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_gb=props.total_memory / 2**30,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_sms=props.multi_processor_count)
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
