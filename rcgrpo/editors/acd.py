"""The ACD recorder of every editor family: swap attention processors, capture the text→target mass.

    recorder = attach_acd(transformer, last_k=10)            # any supported transformer (Flux, Qwen-Image)
    with recorder.capture(token_mask, text_weights=w) as cap:   # token_mask [N_img] or [B, N_img]
        ...                                                   # rollouts / pipeline calls
    cap.mass [calls, B, N_img] · cap.acd [calls, B] · cap.reward() [B]       (SPEC §7)
    detach_acd(transformer)                                   # the original processor objects come back

The family is chosen from the transformer's class (its class or a base class): a registry maps the
diffusers transformer class name to an `ACDFamily` — which attention modules exist (execution order), the
family's drop-in processor class, and what counts as the stock processor. Flux and Qwen-Image are known;
`register_acd_family` adds another. The family modules are imported on first use by name, so this module
imports neither.

True CFG (a conditional and an unconditional transformer pass per step) records the conditional pass
only: the rollout that runs the passes marks them with `recorder.conditional_rows(rows)`:
`rows=0` around an unconditional pass (its calls run stock and count as skipped "unconditional"), `rows=k`
around a batched pass whose first k rows are the conditional ones (only those rows are recorded; the
families with true CFG honour it), `None` (the default, outside any mark) records every row. A stock
pipeline called inside a capture without those marks records every call it makes.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..method.acd import acd_from_mass, acd_reward

DEFAULT_LAST_K = 10
_RECORDER_ATTR = "_rcgrpo_acd_recorder"
SKIP_REASONS = ("attention_mask", "grad", "context_parallel", "unconditional")
PROCESSOR_MODES = ("auto", "fused", "sdpa", "eager")


# ----------------------------------------------------------------------------------------------
# Families: transformer class → attention modules, ACD processor, stock check
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ACDFamily:
    """What the recorder needs of one transformer family."""

    name: str
    attention_modules: Callable[[torch.nn.Module], list[tuple[str, torch.nn.Module]]]  # execution order
    processor_class: type  # called as processor_class(recorder, layer_index, backend=..., mode=...)
    is_stock: Callable[[object], bool]  # whether a processor computes what the stock one computes
    stock_processor: str  # the stock processor's class name, for error messages


_FAMILIES: dict[str, ACDFamily] = {}
# Built-in families, imported on first use: class name -> module defining ACD_FAMILY.
_BUILTIN_MODULES = {
    "FluxTransformer2DModel": "rcgrpo.editors.flux_kontext.attention",
    "QwenImageTransformer2DModel": "rcgrpo.editors.qwen_image_edit.attention",
}


def register_acd_family(transformer_class: str, family: ACDFamily) -> None:
    """Make `attach_acd` handle transformers of the class named `transformer_class` (and its subclasses)."""
    if not isinstance(family, ACDFamily):
        raise TypeError(f"register_acd_family: expected an ACDFamily, got {type(family).__name__}")
    _FAMILIES[transformer_class] = family


def acd_family(transformer) -> ACDFamily:
    """The `ACDFamily` of `transformer`, from its class or the nearest registered base class."""
    for cls in type(transformer).__mro__:
        name = cls.__name__
        if name not in _FAMILIES and name in _BUILTIN_MODULES:
            _FAMILIES[name] = importlib.import_module(_BUILTIN_MODULES[name]).ACD_FAMILY
        if name in _FAMILIES:
            return _FAMILIES[name]
    known = sorted(set(_FAMILIES) | set(_BUILTIN_MODULES))
    raise TypeError(f"attach_acd: no ACD processor for a {type(transformer).__name__}; supported transformer "
                    f"classes: {', '.join(known)}")


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

    def _weights_for_rows(self, rows: int, text_len: int, device: torch.device,
                          text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[rows, text_len]` fp32 weights of the recorded rows of a call whose text may be padded.

        `text_mask` `[≥rows, text_len]` (True = a real token) is the call's text mask. Weights shorter than
        the call's text are zero-padded when every extra position is masked padding in the recorded rows;
        no weights weigh every real (unmasked) position 1."""
        w = self.text_weights
        if w is None:
            ones = torch.ones(rows, text_len, device=device, dtype=torch.float32)
            return ones if text_mask is None else ones * text_mask[:rows].to(device=device, dtype=torch.float32)
        if w.dim() == 2 and w.shape[0] != rows:
            raise ValueError(f"ACD capture: text_weights have {w.shape[0]} rows but the call records {rows} rows")
        given = w.shape[-1]
        padded = given < text_len and text_mask is not None and not bool(text_mask[:rows, given:].any())
        if given != text_len and not padded:
            raise ValueError(
                f"ACD capture: text_weights of shape {tuple(w.shape)} do not fit an attention call with "
                f"{text_len} text tokens: expected [text_len] or [B, text_len] (shorter only when the extra "
                "positions are masked padding)"
            )
        w = w.to(device=device, dtype=torch.float32).expand(rows, -1)
        if padded:
            w = torch.nn.functional.pad(w, (0, text_len - given))
        return w

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
# Recorder, attach / detach
# ----------------------------------------------------------------------------------------------
class ACDRecorder:
    """Owns the ACD processors of one transformer; `capture(...)` collects their mass.

    `layer_indices` are execution-order indices of the selected attention modules, `layer_names`
    their module paths, `family` the transformer's `ACDFamily`.
    """

    def __init__(self, transformer, selected: list[tuple[int, str, torch.nn.Module]], *, backend: str, mode: str,
                 phases=None, family: ACDFamily | None = None):
        self.transformer = transformer
        self.family = family if family is not None else acd_family(transformer)
        self.backend = backend
        self.mode = mode
        self.phases = phases
        self.layer_indices = [index for index, _, _ in selected]
        self.layer_names = [name for _, name, _ in selected]
        self._modules = [module for _, _, module in selected]
        self._originals = [module.processor for module in self._modules]
        self.processors: list = []
        self._capture: Capture | None = None
        self._conditional_rows: int | None = None
        self.attached = False

    @property
    def active_capture(self) -> Capture | None:
        """The open capture, if any (None also during an unconditional pass)."""
        return None if self._conditional_rows == 0 else self._capture

    @property
    def rows(self) -> int | None:
        """Leading batch rows that the current pass records (None: all of them; 0: none)."""
        return self._conditional_rows

    def capture_for_call(self) -> Capture | None:
        """What a processor calls first: the capture to record into, or None to run stock (no capture open,
        or an unconditional pass, which is counted as skipped)."""
        cap = self._capture
        if cap is not None and self._conditional_rows == 0:
            cap._skip("unconditional")
            return None
        return cap

    @contextlib.contextmanager
    def conditional_rows(self, rows: int | None):
        """Mark the transformer calls inside: `rows` leading batch rows are the conditional ones (0: an
        unconditional pass, not recorded; None: every row)."""
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
            raise ValueError(f"conditional_rows: rows must be an int ≥ 0 or None, got {rows!r}")
        previous, self._conditional_rows = self._conditional_rows, rows
        try:
            yield
        finally:
            self._conditional_rows = previous

    def mark(self, name: str):
        """Context manager around one ACD op call: the `phases` marker given to `attach_acd` (e.g. the
        trainer's `Phases`), else a `torch.profiler.record_function("rcgrpo/<name>")` range."""
        if self.phases is not None:
            return self.phases(name)
        return torch.profiler.record_function(f"rcgrpo/{name}")

    def _install(self) -> None:
        for index, module, original in zip(self.layer_indices, self._modules, self._originals):
            proc = self.family.processor_class(self, index, backend=self.backend, mode=self.mode)
            # Keep the stock path identical if an attention backend / parallel config was set.
            own = getattr(original, "__dict__", {})
            if "_attention_backend" in own:
                proc._attention_backend = original._attention_backend
            if "_parallel_config" in own:
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
        if self._capture is not None:
            raise RuntimeError("an ACD capture is already open on this recorder (captures do not nest)")
        cap = Capture(*_check_capture_args(token_mask, text_len, image_len, text_weights))

        def pre_hook(module, args, kwargs):
            if self._conditional_rows == 0:  # an unconditional pass: nothing of it is recorded
                return
            hidden = kwargs.get("hidden_states", args[0] if len(args) > 0 else None)
            encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            cap._observe_inputs(hidden, encoder)

        handle = self.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._capture = cap
        try:
            yield cap
        finally:
            self._capture = None
            cap.open = False
            handle.remove()

    def heatmap(self, image, path, *, capture: Capture, calls=None, mask=None, grid=None, index: int = 0,
                alpha: float = 0.5, cmap: str = "jet") -> Path:
        """Save the ACD heatmap of `capture` over `image` as a PNG (see `save_acd_heatmap`)."""
        from .heatmap import save_acd_heatmap

        return save_acd_heatmap(image, path, capture, calls=calls, mask=mask, grid=grid, index=index,
                                alpha=alpha, cmap=cmap)

    def __repr__(self) -> str:
        return (f"ACDRecorder({self.family.name}, layers={self.layer_indices}, backend={self.backend!r}, "
                f"attached={self.attached})")


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

    The family comes from the transformer's class (`acd_family`). For FLUX.1 (19 double + 38 single
    blocks) the default selects the last 10 single-stream blocks; for Qwen-Image (60 double-stream
    blocks) the last 10 blocks. A model with fewer attention modules gets all of them, with a warning.
    The original processor objects are kept; `detach_acd(transformer)` puts them back. Returns the recorder.

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
    family = acd_family(transformer)
    modules = family.attention_modules(transformer)
    if getattr(transformer, _RECORDER_ATTR, None) is not None or any(
        isinstance(m.processor, family.processor_class) for _, m in modules
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
        if not family.is_stock(proc):
            raise TypeError(
                f"attach_acd: {name} uses {type(proc).__name__}; only the stock {family.stock_processor} can be "
                "replaced by the ACD processor without changing the model's output"
            )
    recorder = ACDRecorder(transformer, selected, backend=backend, mode=mode, phases=phases, family=family)
    recorder._install()
    setattr(transformer, _RECORDER_ATTR, recorder)
    return recorder


def detach_acd(transformer) -> None:
    """Put back the original processor objects that `attach_acd` replaced."""
    recorder = getattr(transformer, _RECORDER_ATTR, None)
    if recorder is None:
        raise RuntimeError("detach_acd: ACD is not attached to this transformer")
    if recorder._capture is not None:
        raise RuntimeError("detach_acd: an ACD capture is still open; leave the `with` block first")
    recorder._restore()
    delattr(transformer, _RECORDER_ATTR)


def get_acd_recorder(transformer) -> ACDRecorder | None:
    """The recorder attached to `transformer`, or None."""
    return getattr(transformer, _RECORDER_ATTR, None)


__all__ = [
    "ACDFamily",
    "ACDRecorder",
    "Capture",
    "DEFAULT_LAST_K",
    "PROCESSOR_MODES",
    "SKIP_REASONS",
    "acd_family",
    "attach_acd",
    "detach_acd",
    "get_acd_recorder",
    "register_acd_family",
]
