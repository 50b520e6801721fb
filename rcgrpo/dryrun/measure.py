"""Measuring one iteration: wall time and peak memory per phase.

`PhaseTracker` listens to the trainer's phases (`rcgrpo.train.phases`): top-level phases are
exclusive (a nested one pauses its parent), sub-phases are inclusive and may repeat. Every phase
boundary synchronizes the device and reads the peak memory: CUDA's `max_memory_allocated`, or on a
CPU the resident set size's high-water mark (reset through /proc/self/clear_refs, with glibc told to
mmap allocations above 256 KiB so freed tensors leave the RSS). Forward hooks on the transformer and
the VAE encoder add the sub-phases the trainer does not mark itself.
"""
from __future__ import annotations

import contextlib
import ctypes
import time

import torch

PHASES = (  # key, label, parent (display order)
    ("iteration", "iteration", None),
    ("rollout", "rollout", "iteration"),
    ("rollout_transformer", "transformer forward", "rollout"),
    ("acd", "ACD", "rollout_transformer"),
    ("vae_encode", "VAE encode", "rollout"),
    ("decode", "decode", "iteration"),
    ("reward", "reward", "iteration"),
    ("advantages", "advantages", "iteration"),
    ("update", "update", "iteration"),
    ("anchor_forward", "anchor forward", "update"),
    ("distances", "distances", "update"),
    ("optimizer", "optimizer", "update"),
    ("backward", "backward and rest", "update"),
    ("diagnostics", "post-update diagnostics", "iteration"),
    ("other", "other", "iteration"),
)
TOP_PHASES = ("rollout", "decode", "reward", "advantages", "update", "diagnostics")
DERIVED_PHASES = ("backward", "other")


class _HostMemory:
    """Resident set size of this process and its resettable high-water mark (Linux /proc)."""

    def __init__(self):
        self.resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.resettable = self.peak() > 0
        except OSError:
            self.resettable = False

    @staticmethod
    def _status(key: str) -> int:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def current(self) -> int:
        value = self._status("VmRSS")
        if value:
            return value
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        value = self._status("VmHWM")
        return value if value else self.current()

    def reset(self) -> None:
        if self.resettable:
            try:
                with open("/proc/self/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                self.resettable = False


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_host_allocator() -> bool:
    """Make glibc mmap allocations above 256 KiB, so freed tensors leave the RSS (honest CPU peaks)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, 256 * 1024))


def trim_host_heap() -> None:
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PhaseTracker:
    """Wall time and peak memory per phase; top-level phases are exclusive (a nested one pauses its parent).

    Sub-phases are inclusive and may repeat (times add up, peaks take the maximum). Every phase
    boundary synchronizes the device, updates the peaks of the active phases and resets the
    device's peak counter.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = None if self.cuda else _HostMemory()
        self.time: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._tops: list[list] = []  # [name, start]
        self._subs: dict[str, list] = {}  # name -> [start, depth]
        self.reserved_peak = 0
        self.total_peak = 0
        self.failed_in: list[str] | None = None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _flush(self) -> None:
        if self.cuda:
            value = torch.cuda.max_memory_allocated(self.device)
            self.reserved_peak = max(self.reserved_peak, torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            value = self.host.peak()
            self.host.reset()
        self.total_peak = max(self.total_peak, value)
        active = list(self._subs)
        if self._tops:
            active.append(self._tops[-1][0])
        for name in active:
            self.peak[name] = max(self.peak.get(name, 0), value)

    def enter(self, name: str, *, top: bool = False) -> None:
        self._sync()
        self._flush()
        now = time.perf_counter()
        self.calls[name] = self.calls.get(name, 0) + 1
        if top:
            if self._tops:
                outer = self._tops[-1]
                self.time[outer[0]] = self.time.get(outer[0], 0.0) + now - outer[1]
            self._tops.append([name, now])
        elif name in self._subs:
            self._subs[name][1] += 1
        else:
            self._subs[name] = [now, 1]

    def exit(self, name: str, *, top: bool = False) -> None:
        self._sync()
        self._flush()
        now = time.perf_counter()
        if top:
            if not self._tops or self._tops[-1][0] != name:
                raise RuntimeError(f"phase {name!r} is not the innermost open top-level phase")
            _, start = self._tops.pop()
            self.time[name] = self.time.get(name, 0.0) + now - start
            if self._tops:
                self._tops[-1][1] = now
            return
        entry = self._subs.get(name)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.time[name] = self.time.get(name, 0.0) + now - entry[0]
            del self._subs[name]

    @contextlib.contextmanager
    def phase(self, name: str, *, top: bool = False):
        self.enter(name, top=top)
        try:
            yield
        finally:
            self.exit(name, top=top)

    def active_phases(self) -> list[str]:
        """Open phases, outermost first (paused top-level phases included)."""
        order = {key: i for i, (key, _, _) in enumerate(PHASES)}
        return sorted([t[0] for t in self._tops] + list(self._subs), key=lambda k: order.get(k, len(order)))

    def close_all(self) -> None:
        """Close phases left open (a hook that never ran its exit, an exception)."""
        while self._tops:
            self.exit(self._tops[-1][0], top=True)
        for name in list(self._subs):
            self._subs[name][1] = 1
            self.exit(name)

    def current_memory(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return self.host.current()

    # -- the trainer's phase listener interface (rcgrpo.train.phases) -----------------------------
    def phase_start(self, name: str) -> None:
        if name in _KNOWN:
            self.enter(name, top=name in TOP_PHASES)

    def phase_end(self, name: str, error: BaseException | None) -> None:
        if name not in _KNOWN:
            return
        if error is not None and self.failed_in is None:  # the innermost phases open at the failure
            self.failed_in = self.active_phases()
        self.exit(name, top=name in TOP_PHASES)


_KNOWN = {key for key, _, _ in PHASES} - set(DERIVED_PHASES)


@contextlib.contextmanager
def module_timers(tracker: PhaseTracker, transformer, vae):
    """Forward hooks (removed on exit) that add the sub-phases the trainer does not mark: the
    transformer forwards of the rollout (`rollout_transformer`) and the VAE encoding of the context
    image (`vae_encode`)."""
    open_forward: list[bool] = []

    def transformer_pre(_module, _args, _kwargs):
        inside_rollout = bool(tracker._tops) and tracker._tops[-1][0] == "rollout"
        open_forward.append(inside_rollout)
        if inside_rollout:
            tracker.enter("rollout_transformer")

    def transformer_post(_module, _args, _kwargs, _output):
        if open_forward and open_forward.pop():
            tracker.exit("rollout_transformer")

    handles = [
        transformer.register_forward_pre_hook(transformer_pre, with_kwargs=True),
        transformer.register_forward_hook(transformer_post, with_kwargs=True),
        vae.encoder.register_forward_pre_hook(lambda *_: tracker.enter("vae_encode")),
        vae.encoder.register_forward_hook(lambda *_: tracker.exit("vae_encode")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["DERIVED_PHASES", "PHASES", "PhaseTracker", "TOP_PHASES", "module_timers", "trim_host_heap",
           "tune_host_allocator"]
