"""Drop-in diffusers attention processor that records Attention Concentration Density (SPEC §7, §9).

    recorder = attach_acd(pipe.transformer, last_k=10)        # swap the last 10 attention processors
    with recorder.capture(token_mask) as cap:                 # token_mask [N_img] or [B, N_img]
        pipe(...)                                             # any call of the stock pipeline/transformer
    cap.mass      # [calls, B, N_img] fp32   a(u) per recorded attention call, in execution order
    cap.acd       # [calls, B]               ACD_{l,t}
    cap.reward()  # [B]                      R_acd = mean over calls (layers × steps)
    detach_acd(pipe.transformer)                              # the original processor objects come back

Outside a capture `FluxACDAttnProcessor` *is* diffusers' `FluxAttnProcessor` (it delegates to it, so
results are identical bit for bit). Inside a capture it computes the same q/k/v (projections, q/k
norms, `[text | image]` concatenation, RoPE) and calls `rcgrpo_kernels.acd_attention`, which returns
the joint attention output and the text→target-image mass in one pass. Calls that the op cannot serve
run stock and are not recorded, only counted in `cap.skipped`: calls with an `attention_mask` (the op
has no mask input), calls that need gradients (the op is forward-only), and calls under diffusers'
context parallelism (the op needs the whole sequence on one device).

Layout: Kontext's joint sequence is `[text (N_txt) | target image (N_img) | context image (N_ctx)]`;
the mass covers tokens `N_txt .. N_txt + N_img − 1`. Note that a pipeline running true CFG (a negative
prompt with `true_cfg_scale > 1`) calls the transformer twice per step: both calls are recorded.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from rcgrpo_kernels import acd_attention
from rcgrpo_kernels.acd_attention import acd_attention_eager

from ..method.acd import acd_from_mass, acd_reward
from .heatmap import save_acd_heatmap

DEFAULT_LAST_K = 10
_RECORDER_ATTR = "_rcgrpo_acd_recorder"
SKIP_REASONS = ("attention_mask", "grad", "context_parallel")
PROCESSOR_MODES = ("auto", "fused", "sdpa", "eager")


# ----------------------------------------------------------------------------------------------
# Layer selection
# ----------------------------------------------------------------------------------------------
def attention_modules(transformer) -> list[tuple[str, torch.nn.Module]]:
    """`(name, attention module)` of a Flux transformer in execution order: double- then single-stream blocks."""
    if not (hasattr(transformer, "transformer_blocks") and hasattr(transformer, "single_transformer_blocks")):
        raise TypeError(
            f"expected a Flux transformer with `transformer_blocks` and `single_transformer_blocks`, "
            f"got {type(transformer).__name__}"
        )
    modules = []
    for group in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, group)):
            modules.append((f"{group}.{i}.attn", block.attn))
    return modules


# ----------------------------------------------------------------------------------------------
# Capture: what one `with recorder.capture(...)` block collected
# ----------------------------------------------------------------------------------------------
class Capture:
    """Attention mass of the selected layers, one entry per recorded call, kept on the device.

    `mass` `[calls, B, image_len]` fp32, `acd` `[calls, B]`, `reward()` `[B]`; `layers[i]` is the
    execution-order index of the attention module of call i; `skipped` counts unrecorded calls by reason.
    """

    def __init__(self, token_mask: torch.Tensor, text_len: int | None, image_len: int,
                 text_weights: torch.Tensor | None):
        self.token_mask = token_mask
        self.image_len = image_len
        self.text_weights = text_weights
        self._explicit_text_len = text_len
        self._seen_text_len: int | None = None
        self._mass: list[torch.Tensor] = []
        self._layers: list[int] = []
        self._stacked: torch.Tensor | None = None
        self._weights_on: dict[torch.device, torch.Tensor] = {}
        self.skipped: dict[str, int] = {reason: 0 for reason in SKIP_REASONS}
        self.open = True

    # -- results -----------------------------------------------------------------------------
    @property
    def num_calls(self) -> int:
        return len(self._mass)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def layers(self) -> list[int]:
        return list(self._layers)

    @property
    def text_len(self) -> int | None:
        """The text length in use: the one given to `capture`, else the last one the transformer was called with."""
        return self._explicit_text_len if self._explicit_text_len is not None else self._seen_text_len

    def _require_calls(self) -> None:
        if not self._mass:
            skipped = {k: v for k, v in self.skipped.items() if v}
            why = f"; calls skipped: {skipped}" if skipped else ""
            raise RuntimeError(
                "ACD capture recorded no attention calls: run the pipeline or transformer inside the "
                f"`with recorder.capture(...)` block, with gradients disabled and no attention mask{why}"
            )

    @property
    def mass(self) -> torch.Tensor:
        """`[calls, B, image_len]` fp32 a(u) per recorded call, in execution order."""
        self._require_calls()
        if self._stacked is None or self._stacked.shape[0] != len(self._mass):
            batches = {m.shape[0] for m in self._mass}
            if len(batches) > 1:
                raise RuntimeError(f"recorded calls have different batch sizes {sorted(batches)}: cannot stack them")
            self._stacked = torch.stack(self._mass)
        return self._stacked

    @property
    def acd(self) -> torch.Tensor:
        """`[calls, B]` ACD_{l,t} of each recorded call."""
        return acd_from_mass(self.mass, self.token_mask)

    def reward(self) -> torch.Tensor:
        """`[B]` R_acd: ACD averaged over the recorded calls (selected layers × steps)."""
        self._require_calls()
        return acd_reward(self.acd)

    # -- called by the hook and the processors -------------------------------------------------
    def _observe_inputs(self, hidden_states, encoder_hidden_states) -> None:
        """Forward pre-hook on the transformer: learn and check the text length and image tokens."""
        if encoder_hidden_states is None:
            self._seen_text_len = None
        else:
            n_text = int(encoder_hidden_states.shape[1])
            if self._explicit_text_len is not None and n_text != self._explicit_text_len:
                raise ValueError(
                    f"ACD capture: text_len={self._explicit_text_len} was given, but the transformer was called "
                    f"with {n_text} text tokens (encoder_hidden_states.shape[1])"
                )
            self._seen_text_len = n_text
        if hidden_states is not None and hidden_states.dim() == 3 and hidden_states.shape[1] < self.image_len:
            raise ValueError(
                f"ACD capture: image_len={self.image_len} (token_mask.shape[-1]) exceeds the "
                f"{hidden_states.shape[1]} image tokens the transformer was called with; the token mask "
                "must cover the target image tokens"
            )

    def _text_len_for_call(self, layer: int, encoder_len: int | None) -> int:
        if encoder_len is not None:  # double-stream block: the text is encoder_hidden_states
            expected = self.text_len
            if expected is not None and encoder_len != expected:
                raise ValueError(
                    f"ACD capture: attention layer {layer} got {encoder_len} text tokens "
                    f"(encoder_hidden_states.shape[1]) but text_len is {expected}"
                )
            return encoder_len
        if self.text_len is None:
            raise ValueError(
                f"ACD capture: text_len is unknown in single-stream attention layer {layer}; pass "
                "text_len= to capture() when calling blocks or attention modules directly"
            )
        return self.text_len

    def _weights_for_call(self, batch: int, text_len: int, device: torch.device) -> torch.Tensor | None:
        w = self.text_weights
        if w is None:
            return None
        if w.shape[-1] != text_len or (w.dim() == 2 and w.shape[0] != batch):
            raise ValueError(
                f"ACD capture: text_weights of shape {tuple(w.shape)} do not fit an attention call with "
                f"batch {batch} and {text_len} text tokens: expected [text_len] or [B, text_len]"
            )
        on_device = self._weights_on.get(device)
        if on_device is None:
            on_device = self._weights_on[device] = w.to(device=device, dtype=torch.float32)
        return on_device.expand(batch, -1) if on_device.dim() == 1 else on_device

    def _check_batch(self, layer: int, batch: int) -> None:
        if self.token_mask.dim() == 2 and self.token_mask.shape[0] != batch:
            raise ValueError(
                f"ACD capture: token_mask has {self.token_mask.shape[0]} rows but attention layer {layer} "
                f"runs a batch of {batch}"
            )

    def _record(self, layer: int, mass: torch.Tensor) -> None:
        self._mass.append(mass)
        self._layers.append(layer)

    def _skip(self, reason: str) -> None:
        if reason == "attention_mask" and self.skipped[reason] == 0:
            warnings.warn(
                "ACD capture: an attention call with an attention_mask ran the stock attention and was not "
                "recorded (acd_attention has no mask input)",
                stacklevel=4,
            )
        self.skipped[reason] += 1

    def __repr__(self) -> str:
        return (f"Capture(num_calls={self.num_calls}, image_len={self.image_len}, text_len={self.text_len}, "
                f"skipped={self.num_skipped})")


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------
class FluxACDAttnProcessor(FluxAttnProcessor):
    """`FluxAttnProcessor` that, inside a capture of its recorder, also records the text→image mass.

    Works in double-stream (`encoder_hidden_states` given) and single-stream blocks. Holds its recorder
    and its execution-order layer index; no global state.
    """

    def __init__(self, recorder: "ACDRecorder | None" = None, layer_index: int = -1, *,
                 backend: str = "auto", mode: str = "auto"):
        super().__init__()
        self.recorder = recorder
        self.layer_index = layer_index
        self.backend = backend
        self.mode = mode

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        capture = None if self.recorder is None else self.recorder.active_capture
        if capture is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        reason = self._skip_reason(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if reason is not None:
            capture._skip(reason)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self._captured_call(capture, attn, hidden_states, encoder_hidden_states, image_rotary_emb)

    def _skip_reason(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        if attention_mask is not None:
            return "attention_mask"
        if self._parallel_config is not None:
            return "context_parallel"
        if torch.is_grad_enabled():
            tensors = [hidden_states, encoder_hidden_states]
            if isinstance(image_rotary_emb, (tuple, list)):
                tensors.extend(image_rotary_emb)
            else:
                tensors.append(image_rotary_emb)
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors) or any(
                p.requires_grad for p in attn.parameters()
            ):
                return "grad"
        return None

    def _captured_call(self, capture: Capture, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        # Same q/k/v as FluxAttnProcessor.__call__: projections, q/k norms, [text | image], RoPE.
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        encoder_len = None
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            encoder_len = encoder_query.shape[1]
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        batch, seq = query.shape[0], query.shape[1]
        layer = self.layer_index
        text_len = capture._text_len_for_call(layer, encoder_len)
        if text_len + capture.image_len > seq:
            raise ValueError(
                f"ACD capture: attention layer {layer} has a joint sequence of {seq} tokens, shorter than "
                f"text_len + image_len = {text_len} + {capture.image_len}; check text_len and the token mask"
            )
        capture._check_batch(layer, batch)
        weights = capture._weights_for_call(batch, text_len, query.device)

        # [B, N, H, D] -> [B, H, N, D] (contiguous, so every backend sees the SDPA layout densely).
        # [B, N, H, D] -> [B, H, N, D] views (unit stride in D): every acd_attention backend takes this
        # layout without a copy and returns `out` in it, so the flatten below is a view.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        with self.recorder.mark("acd"):
            if self.mode == "eager":
                out, mass = acd_attention_eager(q, k, v, text_len, capture.image_len, text_weights=weights)
            else:
                out, mass = acd_attention(q, k, v, text_len, capture.image_len, text_weights=weights,
                                          backend=self.backend, mode=self.mode)
        capture._record(layer, mass)

        hidden_states = out.transpose(1, 2).flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


# ----------------------------------------------------------------------------------------------
# Recorder, attach / detach
# ----------------------------------------------------------------------------------------------
class ACDRecorder:
    """Owns the ACD processors of one transformer; `capture(...)` collects their mass.

    `layer_indices` are execution-order indices of the selected attention modules, `layer_names`
    their module paths.
    """

    def __init__(self, transformer, selected: list[tuple[int, str, torch.nn.Module]], *, backend: str, mode: str,
                 phases=None):
        self.transformer = transformer
        self.backend = backend
        self.mode = mode
        self.phases = phases
        self.layer_indices = [index for index, _, _ in selected]
        self.layer_names = [name for _, name, _ in selected]
        self._modules = [module for _, _, module in selected]
        self._originals = [module.processor for module in self._modules]
        self.processors: list[FluxACDAttnProcessor] = []
        self.active_capture: Capture | None = None
        self.attached = False

    def mark(self, name: str):
        """Context manager around one ACD op call: the `phases` marker given to `attach_acd` (e.g. the
        trainer's `Phases`), else a `torch.profiler.record_function("rcgrpo/<name>")` range."""
        if self.phases is not None:
            return self.phases(name)
        return torch.profiler.record_function(f"rcgrpo/{name}")

    def _install(self) -> None:
        for index, module, original in zip(self.layer_indices, self._modules, self._originals):
            proc = FluxACDAttnProcessor(self, index, backend=self.backend, mode=self.mode)
            # Keep the stock path identical if an attention backend / parallel config was set.
            if "_attention_backend" in vars(original):
                proc._attention_backend = original._attention_backend
            if "_parallel_config" in vars(original):
                proc._parallel_config = original._parallel_config
            module.set_processor(proc)
            self.processors.append(proc)
        self.attached = True

    def _restore(self) -> None:
        for module, original in zip(self._modules, self._originals):
            module.set_processor(original)
        self.processors = []
        self.attached = False

    @contextlib.contextmanager
    def capture(
        self,
        token_mask,
        text_len: int | None = None,
        image_len: int | None = None,
        text_weights: torch.Tensor | None = None,
    ) -> Iterator[Capture]:
        """Record the mass of every attention call of the selected layers made inside the block.

        token_mask: `[N_img]` or `[B, N_img]` target-image token mask (image_len = its last dim).
        text_len: text tokens of the joint sequence; default: read from each transformer call.
        text_weights: `[text_len]` or `[B, text_len]` weights w_v of the text queries (default 1).
        """
        if not self.attached:
            raise RuntimeError("ACD recorder is detached from its transformer: call attach_acd(...) again")
        if self.active_capture is not None:
            raise RuntimeError("an ACD capture is already open on this recorder (captures do not nest)")
        cap = Capture(*_check_capture_args(token_mask, text_len, image_len, text_weights))

        def pre_hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if len(args) > 0 else None)
            encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            cap._observe_inputs(hidden, encoder)

        handle = self.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self.active_capture = cap
        try:
            yield cap
        finally:
            self.active_capture = None
            cap.open = False
            handle.remove()

    def heatmap(self, image, path, *, capture: Capture, calls=None, mask=None, grid=None, index: int = 0,
                alpha: float = 0.5, cmap: str = "jet") -> Path:
        """Save the ACD heatmap of `capture` over `image` as a PNG (see `save_acd_heatmap`)."""
        return save_acd_heatmap(image, path, capture, calls=calls, mask=mask, grid=grid, index=index,
                                alpha=alpha, cmap=cmap)

    def __repr__(self) -> str:
        return f"ACDRecorder(layers={self.layer_indices}, backend={self.backend!r}, attached={self.attached})"


def _check_capture_args(token_mask, text_len, image_len, text_weights):
    if not isinstance(token_mask, torch.Tensor):
        token_mask = torch.as_tensor(np.asarray(token_mask))
    if token_mask.dim() not in (1, 2) or token_mask.shape[-1] == 0:
        raise ValueError(f"token_mask must be [N_img] or [B, N_img] with N_img ≥ 1, got shape {tuple(token_mask.shape)}")
    n_img = int(token_mask.shape[-1])
    if image_len is not None and image_len != n_img:
        raise ValueError(f"image_len={image_len} does not match the token mask's {n_img} image tokens")
    if text_len is not None and (isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1):
        raise ValueError(f"text_len must be an int ≥ 1 or None, got {text_len!r}")
    if text_weights is not None:
        if not isinstance(text_weights, torch.Tensor) or text_weights.dim() not in (1, 2):
            raise ValueError("text_weights must be a [text_len] or [B, text_len] tensor")
        if text_len is not None and text_weights.shape[-1] != text_len:
            raise ValueError(f"text_weights has {text_weights.shape[-1]} columns, expected text_len={text_len}")
        if token_mask.dim() == 2 and text_weights.dim() == 2 and text_weights.shape[0] != token_mask.shape[0]:
            raise ValueError(
                f"text_weights batch {text_weights.shape[0]} does not match token_mask batch {token_mask.shape[0]}"
            )
    return token_mask, text_len, n_img, text_weights


def attach_acd(transformer, last_k: int = DEFAULT_LAST_K, *, backend: str = "auto", mode: str = "auto",
               phases=None) -> ACDRecorder:
    """Swap the processors of the last `last_k` attention modules (execution order) for ACD processors.

    For FLUX.1 (19 double + 38 single blocks) the default selects the last 10 single-stream blocks.
    A model with fewer attention modules gets all of them, with a warning. The original processor
    objects are kept; `detach_acd(transformer)` puts them back. Returns the recorder.

    backend: the `acd_attention` backend. mode: the op's modes — "auto" (on CUDA the mode of
    `rcgrpo_kernels.acd_attention.TRITON_AUTO_MODE`, SDPA output + Triton mass until GPU measurements say
    otherwise), "fused", "sdpa" — or "eager" (the materialized-weights baseline `acd_attention_eager`, for
    measurements). phases: an optional
    callable `phases(name) -> context manager` that marks each op call (the trainer passes its
    `rcgrpo.train.phases.Phases`; default: a `torch.profiler.record_function` range "rcgrpo/acd").
    """
    if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1:
        raise ValueError(f"last_k must be an int ≥ 1, got {last_k!r}")
    if mode not in PROCESSOR_MODES:
        raise ValueError(f"attach_acd: mode must be one of {PROCESSOR_MODES}, got {mode!r}")
    modules = attention_modules(transformer)
    if getattr(transformer, _RECORDER_ATTR, None) is not None or any(
        isinstance(m.processor, FluxACDAttnProcessor) for _, m in modules
    ):
        raise RuntimeError(
            "ACD is already attached to this transformer; call detach_acd(transformer) before attaching again"
        )
    if last_k > len(modules):
        warnings.warn(
            f"attach_acd: last_k={last_k} but the transformer has only {len(modules)} attention modules; "
            "recording all of them",
            stacklevel=2,
        )
    selected = [(i, name, m) for i, (name, m) in enumerate(modules)][-last_k:]
    for _, name, module in selected:
        proc = module.processor
        if type(proc).__call__ is not FluxAttnProcessor.__call__:
            raise TypeError(
                f"attach_acd: {name} uses {type(proc).__name__}; only the stock FluxAttnProcessor can be "
                "replaced by the ACD processor without changing the model's output"
            )
    recorder = ACDRecorder(transformer, selected, backend=backend, mode=mode, phases=phases)
    recorder._install()
    setattr(transformer, _RECORDER_ATTR, recorder)
    return recorder


def detach_acd(transformer) -> None:
    """Put back the original processor objects that `attach_acd` replaced."""
    recorder = getattr(transformer, _RECORDER_ATTR, None)
    if recorder is None:
        raise RuntimeError("detach_acd: ACD is not attached to this transformer")
    if recorder.active_capture is not None:
        raise RuntimeError("detach_acd: an ACD capture is still open; leave the `with` block first")
    recorder._restore()
    delattr(transformer, _RECORDER_ATTR)


def get_acd_recorder(transformer) -> ACDRecorder | None:
    """The recorder attached to `transformer`, or None."""
    return getattr(transformer, _RECORDER_ATTR, None)


__all__ = [
    "ACDRecorder",
    "Capture",
    "FluxACDAttnProcessor",
    "attach_acd",
    "attention_modules",
    "detach_acd",
    "get_acd_recorder",
]
