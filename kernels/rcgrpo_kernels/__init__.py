"""rcgrpo_kernels: the ops behind rcgrpo, each with Triton, C++ and torch-reference backends.

- `acd_attention(q, k, v, text_len, image_len, ...)` → `(out, mass)`: attention plus the
  text→image attention mass used by the ACD reward, without materializing attention weights.
- `region_sq_dists(x, y, mask)` → `[T, K, G, 2]`: masked squared distances, differentiable.

`available_backends()` tells which backends run here and why the others do not;
`python -m rcgrpo_kernels` also prints what `backend="auto"` / `mode="auto"` pick and every fallback
(each fallback warns once per process with a `FallbackWarning`).
"""
from ._backends import BACKEND_CHOICES, BACKENDS, FallbackWarning, available_backends, resolve_backend
from .acd_attention import acd_attention, attention_flops
from .region_sq_dists import region_sq_dists, region_sq_dists_bytes

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "FallbackWarning",
    "acd_attention",
    "attention_flops",
    "available_backends",
    "region_sq_dists",
    "region_sq_dists_bytes",
    "resolve_backend",
]
