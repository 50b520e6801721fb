"""torch SDPA with a fixed backend priority, and which SDPA backend a call would use.

`sdpa_priority()` is the context the `mode="sdpa"` path of `acd_attention` runs SDPA under:
cuDNN first (about 630 TFLOP/s on an H100 at head_dim 128, public numbers), then FlashAttention-2,
memory-efficient attention, and the math fallback, each used only when its constraints hold for
the inputs (dtype, head dim, layout, device). With a torch whose `sdpa_kernel` lacks
`set_priority` (before 2.6) the same backends are allowed in torch's own order.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

# Names of torch.nn.attention.SDPBackend members, in priority order.
SDPA_PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


@functools.lru_cache(maxsize=None)
def sdpa_set_priority_supported() -> bool:
    """Whether `torch.nn.attention.sdpa_kernel` takes `set_priority` (torch >= 2.6)."""
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        return False
    try:
        return "set_priority" in inspect.signature(sdpa_kernel).parameters
    except (TypeError, ValueError):
        return False


def _backends(names):
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, name) for name in names if hasattr(SDPBackend, name)]


def sdpa_priority(names=SDPA_PRIORITY):
    """Context manager: SDPA may use only `names`, tried in that order (where torch supports a
    priority; else in torch's own order)."""
    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:  # very old torch: its default choice
        return contextlib.nullcontext()
    backends = _backends(names)
    if sdpa_set_priority_supported():
        return sdpa_kernel(backends, set_priority=True)
    return sdpa_kernel(backends)


def sdpa_prioritized(q, k, v, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, scale=scale)` under `sdpa_priority()`."""
    with sdpa_priority():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def sdpa_backend_name(q, k, v, scale: float | None = None) -> str | None:
    """Name of the SDPA backend torch picks for these inputs under the current `sdpa_kernel`
    context ("CUDNN_ATTENTION", "FLASH_ATTENTION", ...), from torch's own dispatcher
    (`torch._fused_sdp_choice`); None where that private function is missing or fails."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    try:
        index = int(choose(q, k, v, None, 0.0, False, scale=scale))
        from torch.nn.attention import SDPBackend

        for member in SDPBackend.__members__.values():
            if int(member.value) == index:
                return member.name
    except Exception:  # noqa: BLE001 - diagnostics only
        return None
    return None


__all__ = ["SDPA_PRIORITY", "sdpa_backend_name", "sdpa_prioritized", "sdpa_priority", "sdpa_set_priority_supported"]
