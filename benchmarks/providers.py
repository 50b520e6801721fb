"""Shapes, inputs, providers, timing and peak-memory helpers shared by the benchmark suites.

Everything a suite compares lives here so that the memory probe (a fresh subprocess on CPU, see
`probe_cpu_peak_mb`) builds exactly the inputs and calls exactly the code that the timed runs use.

Run as a script only by `probe_cpu_peak_mb`:
    python benchmarks/providers.py probe-mem '<json request>'
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# ----------------------------------------------------------------------------------------------
# device and knobs
# ----------------------------------------------------------------------------------------------


def bench_device() -> torch.device:
    """CUDA when present (GPU shapes), else CPU. RCGRPO_BENCH_DEVICE=cpu|cuda overrides."""
    forced = os.environ.get("RCGRPO_BENCH_DEVICE", "").strip()
    if forced:
        return torch.device(forced)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def shape_set(device: torch.device) -> str:
    """'gpu' shapes on CUDA, 'cpu' shapes otherwise; RCGRPO_BENCH_SHAPES=cpu|gpu overrides."""
    forced = os.environ.get("RCGRPO_BENCH_SHAPES", "").strip()
    if forced:
        if forced not in ("cpu", "gpu"):
            raise ValueError(f"RCGRPO_BENCH_SHAPES must be 'cpu' or 'gpu', got {forced!r}")
        return forced
    return "gpu" if device.type == "cuda" else "cpu"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def timing_knobs(device: torch.device) -> dict:
    """Rounds are sized so each provider runs about `target_s` of timed work (bounded)."""
    gpu = device.type == "cuda"
    return {
        "target_s": _env_float("RCGRPO_BENCH_TARGET_S", 0.5 if gpu else 1.5),
        "min_rounds": int(_env_float("RCGRPO_BENCH_MIN_ROUNDS", 10 if gpu else 5)),
        "max_rounds": int(_env_float("RCGRPO_BENCH_MAX_ROUNDS", 200 if gpu else 30)),
        "warmup_rounds": int(_env_float("RCGRPO_BENCH_WARMUP", 3 if gpu else 1)),
    }


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttnShape:
    label: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    text_len: int
    image_len: int
    dtype: str

    @property
    def group(self) -> str:
        return (f"acd_attention {self.label}: B={self.batch} H={self.heads} N={self.seq} D={self.head_dim} "
                f"text={self.text_len} image={self.image_len} {self.dtype}")

    @property
    def id(self) -> str:
        return self.label


@dataclass(frozen=True)
class DistShape:
    label: str
    steps: int
    anchors: int
    group_size: int
    dim: int
    dtype: str

    def group(self, mode: str) -> str:
        return (f"region_sq_dists {mode} {self.label}: T={self.steps} K={self.anchors} G={self.group_size} "
                f"D={self.dim} {self.dtype}")

    @property
    def id(self) -> str:
        return self.label


# Kontext's joint sequence is [text 512 | target image | context image]; image = (px/16)².
ATTN_SHAPES = {
    "cpu": [
        AttnShape("cpu-issue", 1, 4, 2048, 64, 256, 1024, "float32"),
    ],
    "gpu": [
        AttnShape("kontext-512px", 1, 24, 512 + 1024 + 1024, 128, 512, 1024, "bfloat16"),
        AttnShape("kontext-1024px", 1, 24, 512 + 4096 + 4096, 128, 512, 4096, "bfloat16"),
    ],
}

# D = image tokens × 64 latent channels; T = the 28 Euler steps, G = 12 candidates, K = 4 anchors.
DIST_SHAPES = {
    "cpu": [
        DistShape("cpu-issue", 8, 4, 12, 65536, "float32"),
    ],
    "gpu": [
        DistShape("kontext-512px", 28, 4, 12, 1024 * 64, "bfloat16"),
        DistShape("kontext-1024px", 28, 4, 12, 4096 * 64, "bfloat16"),
    ],
}

ATTN_PROVIDERS = ["sdpa", "sdpa_cudnn", "eager", "triton_fused", "triton_sdpa_mass", "auto", "cpp", "torch_ref"]
# Providers that run torch SDPA (alone or inside the op): their extra_info records the SDPA backend.
SDPA_PROVIDERS = ("sdpa", "sdpa_cudnn", "triton_sdpa_mass", "auto")
DIST_PROVIDERS = ["copy", "eager", "triton", "cpp", "torch_ref"]
DIST_MODES = ["fwd", "fwd+bwd"]


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------


def _memory_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def backend_skip_reason(backend: str, device: torch.device) -> str | None:
    """Why an rcgrpo_kernels backend is not benchmarked on `device` (None: it is)."""
    from rcgrpo_kernels._backends import backend_unavailable_reason

    if backend == "triton" and device.type == "cpu" and os.environ.get("RCGRPO_BENCH_ALLOW_INTERPRETER") != "1":
        return ("Triton on CPU tensors runs only under the TRITON_INTERPRET=1 interpreter, which is a "
                "correctness path, not a performance path (set RCGRPO_BENCH_ALLOW_INTERPRETER=1 to time it anyway)")
    return backend_unavailable_reason(backend, device)


def eager_attention_bytes(shape: AttnShape) -> int:
    """Logits and softmax weights, both [B, H, N, N] in the input dtype."""
    item = torch.empty((), dtype=dtype_of(shape.dtype)).element_size()
    return 2 * shape.batch * shape.heads * shape.seq * shape.seq * item


def eager_dists_bytes(shape: DistShape, mode: str) -> int:
    """diff, square, the two masked products ([T, K, G, D] each); about twice that with backward."""
    item = torch.empty((), dtype=dtype_of(shape.dtype)).element_size()
    full = shape.steps * shape.anchors * shape.group_size * shape.dim * item
    return (4 if mode == "fwd" else 8) * full


def attention_skip_reason(provider: str, shape: AttnShape, device: torch.device) -> str | None:
    if provider in ("triton_fused", "triton_sdpa_mass"):
        reason = backend_skip_reason("triton", device)
        return None if reason is None else f"triton: {reason}"
    if provider == "sdpa_cudnn":
        if device.type != "cuda":
            return "cuDNN attention runs on CUDA tensors only"
        runnable = sdpa_backends_runnable(make_attention_inputs(shape, device))
        if not runnable.get("CUDNN_ATTENTION"):
            return f"SDPA cannot use cuDNN for these inputs on this machine ({runnable})"
        return None
    if provider == "auto":
        if device.type != "cuda":
            return ("on CPU tensors backend='auto' resolves to the C++ backend: the same computation as "
                    "the `cpp` provider (mode='auto' only matters on the Triton backend)")
        reason = backend_skip_reason("triton", device)
        return None if reason is None else f"triton: {reason}"
    if provider == "cpp":
        reason = backend_skip_reason("cpp", device)
        return None if reason is None else f"cpp: {reason}"
    if provider == "eager":
        need = eager_attention_bytes(shape)
        budget = _memory_budget_bytes(device)
        if need > 0.85 * budget:
            return (f"eager attention would materialize {need / 2**30:.1f} GiB of logits and weights, more than "
                    f"85% of the {budget / 2**30:.1f} GiB free on {device.type}")
    return None


def dists_skip_reason(provider: str, shape: DistShape, mode: str, device: torch.device) -> str | None:
    if provider == "copy" and device.type != "cuda":
        return "the copy-bandwidth reference is measured on CUDA only (the GPU target is a fraction of it)"
    if provider in ("triton", "cpp"):
        reason = backend_skip_reason(provider, device)
        return None if reason is None else f"{provider}: {reason}"
    if provider == "eager":
        need = eager_dists_bytes(shape, mode)
        budget = _memory_budget_bytes(device)
        if need > 0.85 * budget:
            return (f"eager distances would build [T,K,G,D] intermediates of about {need / 2**30:.1f} GiB, more "
                    f"than 85% of the {budget / 2**30:.1f} GiB free on {device.type}")
    return None


# ----------------------------------------------------------------------------------------------
# inputs and providers
# ----------------------------------------------------------------------------------------------


def make_attention_inputs(shape: AttnShape, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    size = (shape.batch, shape.heads, shape.seq, shape.head_dim)
    q, k, v = (torch.randn(size, generator=gen, device=device).to(dtype_of(shape.dtype)) for _ in range(3))
    return {"q": q, "k": k, "v": v, "text_len": shape.text_len, "image_len": shape.image_len}


def eager_attention(q, k, v, text_len, image_len):
    """What attention-map tools do: materialize softmax(q kᵀ·scale), multiply by v, read the mass from
    the weights (`rcgrpo_kernels.acd_attention.acd_attention_eager`, the one copy of that baseline)."""
    from rcgrpo_kernels.acd_attention import acd_attention_eager

    return acd_attention_eager(q, k, v, text_len, image_len)


def _sdpa_only(name: str):
    """Context: torch SDPA restricted to the one backend `name` (an SDPBackend member name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name)])


_RUNNABLE_CACHE: dict[tuple, dict] = {}


def sdpa_backends_runnable(inputs: dict) -> dict[str, bool | str]:
    """{SDPA backend: True if SDPA runs on these inputs with only that backend allowed, else the
    error}: which backends are usable at all, independently of torch's choice among them. Cached
    per (shape, strides, dtype, device)."""
    from rcgrpo_kernels._sdpa import SDPA_PRIORITY

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    key = (tuple(q.shape), q.stride(), q.dtype, str(q.device))
    if key in _RUNNABLE_CACHE:
        return dict(_RUNNABLE_CACHE[key])
    found: dict[str, bool | str] = {}
    for name in SDPA_PRIORITY:
        try:
            with torch.no_grad(), _sdpa_only(name):
                F.scaled_dot_product_attention(q, k, v)
            found[name] = True
        except Exception as exc:  # noqa: BLE001 - "no available kernel" and friends
            found[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    if q.device.type == "cuda":
        torch.cuda.synchronize(q.device)
    _RUNNABLE_CACHE[key] = dict(found)
    return found


def _sdpa_context(provider: str):
    """The SDPA context a provider runs SDPA under."""
    import contextlib

    from rcgrpo_kernels._sdpa import sdpa_priority

    if provider == "sdpa_cudnn":
        return _sdpa_only("CUDNN_ATTENTION")
    if provider in ("triton_sdpa_mass", "auto"):
        return sdpa_priority()
    return contextlib.nullcontext()  # plain `sdpa`: torch's default choice


def sdpa_backend_info(provider: str, inputs: dict, fn=None) -> dict:
    """Which SDPA backend `provider` actually runs, three ways (extra_info):
    - `sdpa_backend`: torch's own choice under the provider's SDPA context (`torch._fused_sdp_choice`);
    - `sdpa_backends_runnable`: each backend tried alone on these inputs (True or the error);
    - `sdpa_cuda_kernels` (CUDA): names of the CUDA kernels one profiled call of `fn` launched,
      longest first (cuDNN kernels name "cudnn", FlashAttention "flash", memory-efficient "fmha"/"mem_eff").
    For `auto`, also `auto_mode` (what mode="auto" ran); SDPA is used only when it is "sdpa"."""
    from rcgrpo_kernels._sdpa import sdpa_backend_name

    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    info: dict = {}
    if provider == "auto":
        from rcgrpo_kernels.acd_attention import resolve_mode

        info["auto_mode"] = resolve_mode("auto")
        if info["auto_mode"] != "sdpa":
            return info
    with _sdpa_context(provider):
        info["sdpa_backend"] = sdpa_backend_name(q, k, v)
    info["sdpa_backends_runnable"] = sdpa_backends_runnable(inputs)
    if fn is not None and q.device.type == "cuda":
        info["sdpa_cuda_kernels"] = cuda_kernel_names(fn)
    return info


def cuda_kernel_names(fn, top: int = 6) -> list[str] | str:
    """Names of the CUDA kernels one call of `fn` launches (torch.profiler), longest first."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) > 0]
        events.sort(key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
        return [e.key[:120] for e in events[:top]]
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return f"profiler failed: {type(exc).__name__}: {exc}"


def attention_callable(provider: str, inputs: dict):
    """A zero-argument callable running `provider` once on `inputs` (forward only, no grad)."""
    import rcgrpo_kernels

    q, k, v, t, i = inputs["q"], inputs["k"], inputs["v"], inputs["text_len"], inputs["image_len"]

    def run(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    if provider == "sdpa":
        return run(lambda: F.scaled_dot_product_attention(q, k, v))
    if provider == "sdpa_cudnn":
        def cudnn():
            with _sdpa_only("CUDNN_ATTENTION"):
                return F.scaled_dot_product_attention(q, k, v)
        return run(cudnn)
    if provider == "auto":
        return run(lambda: rcgrpo_kernels.acd_attention(q, k, v, t, i))
    if provider == "eager":
        return run(lambda: eager_attention(q, k, v, t, i))
    if provider == "triton_fused":
        return run(lambda: rcgrpo_kernels.acd_attention(q, k, v, t, i, backend="triton", mode="fused"))
    if provider == "triton_sdpa_mass":
        return run(lambda: rcgrpo_kernels.acd_attention(q, k, v, t, i, backend="triton", mode="sdpa"))
    if provider == "cpp":
        return run(lambda: rcgrpo_kernels.acd_attention(q, k, v, t, i, backend="cpp"))
    if provider == "torch_ref":
        return run(lambda: rcgrpo_kernels.acd_attention(q, k, v, t, i, backend="torch"))
    raise ValueError(f"unknown attention provider {provider!r}")


def make_dists_inputs(shape: DistShape, mode: str, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = dtype_of(shape.dtype)
    x = torch.randn(shape.steps, shape.group_size, shape.dim, generator=gen, device=device).to(dtype)
    y = torch.randn(shape.steps, shape.anchors, shape.dim, generator=gen, device=device).to(dtype)
    # A hard mask with a quarter of the tokens (64 channels each) in the edit region, like a real edit.
    tokens = shape.dim // 64 if shape.dim % 64 == 0 else shape.dim
    token_mask = (torch.rand(tokens, generator=gen, device=device) < 0.25).float()
    mask = token_mask.repeat_interleave(shape.dim // tokens)
    grad = None
    if mode == "fwd+bwd":
        x.requires_grad_(True)
        y.requires_grad_(True)
        grad = torch.randn(shape.steps, shape.anchors, shape.group_size, 2, generator=gen, device=device)
    return {"x": x, "y": y, "mask": mask, "grad": grad}


def eager_dists(x, y, mask):
    """The obvious torch expression: builds [T, K, G, D] differences."""
    m = mask.to(x.dtype)
    sq = (x[:, None] - y[:, :, None]) ** 2  # [T, K, G, D]
    s_in = (sq * m).sum(-1)
    s_out = (sq * (1 - m)).sum(-1)
    return torch.stack([s_in, s_out], dim=-1).float()


def dists_callable(provider: str, mode: str, inputs: dict):
    import rcgrpo_kernels

    x, y, mask, grad = inputs["x"], inputs["y"], inputs["mask"], inputs["grad"]
    if provider == "copy":
        # A device copy of as many bytes as the op must read (fwd) or read + write (fwd+bwd, see
        # region_sq_dists_bytes): the bandwidth the op's GB/s is compared with.
        from rcgrpo_kernels import region_sq_dists_bytes

        steps, group, dim = x.shape
        nbytes = region_sq_dists_bytes(steps, group, y.shape[1], dim, x.element_size(), backward=(mode == "fwd+bwd"))
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=x.device)
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if provider == "eager":
        op = eager_dists
    elif provider in ("triton", "cpp"):
        def op(x, y, mask, _b=provider):
            return rcgrpo_kernels.region_sq_dists(x, y, mask, backend=_b)
    elif provider == "torch_ref":
        def op(x, y, mask):
            return rcgrpo_kernels.region_sq_dists(x, y, mask, backend="torch")
    else:
        raise ValueError(f"unknown distance provider {provider!r}")

    if mode == "fwd":
        def call():
            with torch.no_grad():
                return op(x, y, mask)
        return call
    if mode == "fwd+bwd":
        def call():
            with torch.enable_grad():
                s = op(x, y, mask)
                return torch.autograd.grad(s, (x, y), grad_outputs=grad)
        return call
    raise ValueError(f"unknown mode {mode!r}")


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def run_benchmark(benchmark, fn, device: torch.device, *, rounds: int | None = None,
                  warmup_rounds: int | None = None, prewarm: bool = True):
    """Time `fn` with `benchmark.pedantic`; on CUDA the timed target ends with a synchronize.

    With `prewarm`, one untimed call compiles/autotunes (Triton) and touches the memory first. When
    `rounds` is None a second untimed call sizes the rounds to about `target_s` of work (bounded by
    min/max rounds). Returns the median in seconds (None when benchmarking is disabled).
    """
    knobs = timing_knobs(device)
    sync = synchronizer(device)

    def target():
        result = fn()
        sync()
        return result

    if prewarm:
        target()
    if rounds is None:
        t0 = time.perf_counter()
        target()
        once = max(time.perf_counter() - t0, 1e-6)
        rounds = int(min(max(knobs["target_s"] / once, knobs["min_rounds"]), knobs["max_rounds"]))
    warm = knobs["warmup_rounds"] if warmup_rounds is None else warmup_rounds
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=warm)
    stats = getattr(benchmark, "stats", None)
    if stats is None or getattr(stats, "stats", None) is None:
        return None
    return float(stats.stats.median)


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------

CPU_MEM_METHOD = ("peak RSS growth of one call in a fresh subprocess (glibc MALLOC_MMAP_THRESHOLD_ fixed so freed "
                  "buffers return to the OS; /proc/self/clear_refs '5' resets VmHWM before the call; inputs excluded, "
                  "outputs included)")
CUDA_MEM_METHOD = "torch.cuda.max_memory_allocated growth over one call (inputs excluded, outputs included)"


def cuda_peak_mb(fn, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return (peak - base) / 2**20


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset VmHWM (peak RSS) of this process to its current RSS; False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # noqa: BLE001 - not glibc: nothing to trim
        pass


def rss_peak_growth_mb(fn) -> tuple[float | None, str]:
    """Peak RSS growth of one `fn()` call in this process (VmHWM after a clear_refs reset)."""
    import gc

    gc.collect()
    _malloc_trim()
    base = _proc_status_kb("VmRSS")
    if base is None or not reset_hwm():
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        del result
        return (after - before) / 1024, "ru_maxrss growth (lower bound: only counts a new process-wide peak)"
    result = fn()
    peak = _proc_status_kb("VmHWM")
    del result
    return max(peak - base, 0) / 1024, "VmHWM growth after /proc/self/clear_refs reset"


def _probe_main(request: dict) -> dict:
    """Subprocess side: build the inputs once, then per provider warm up, reset VmHWM, call once."""
    device = torch.device("cpu")
    results = {}
    if request["op"] == "attention":
        shape = AttnShape(**request["shape"])
        inputs = make_attention_inputs(shape, device)
        make = lambda p: attention_callable(p, inputs)  # noqa: E731
    else:
        shape = DistShape(**request["shape"])
        inputs = make_dists_inputs(shape, request["mode"], device)
        make = lambda p: dists_callable(p, request["mode"], inputs)  # noqa: E731
    for provider in request["providers"]:
        try:
            fn = make(provider)
            fn()
            mb, method = rss_peak_growth_mb(fn)
            results[provider] = {"peak_mem_mb": mb, "method": method}
        except Exception as exc:  # noqa: BLE001 - report, the timing test shows the real error
            results[provider] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


def probe_cpu_peak_mb(op: str, shape, providers: list[str], mode: str | None = None, timeout: float = 300) -> dict:
    """{provider: {"peak_mem_mb": float, "method": str} | {"error": str}} from one fresh subprocess."""
    request = {"op": op, "shape": asdict(shape), "mode": mode, "providers": list(providers)}
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # a fixed threshold disables glibc's dynamic raising
    env["MALLOC_TRIM_THRESHOLD_"] = "0"
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    path = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env["PYTHONPATH"] = path
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "probe-mem", json.dumps(request)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=str(REPO))
    except subprocess.TimeoutExpired:
        return {p: {"error": f"memory probe timed out after {timeout:.0f} s"} for p in providers}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {p: {"error": f"memory probe failed (rc {proc.returncode}): {tail[0]}"} for p in providers}
    return json.loads(lines[-1])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "probe-mem":
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(json.dumps(_probe_main(json.loads(sys.argv[2]))))
