"""FLUX's drop-in attention processor that records Attention Concentration Density (SPEC §7, §9).

The recorder itself (`attach_acd`, `ACDRecorder`, `Capture`, `detach_acd`) is family-independent and
lives in `rcgrpo.editors.acd`; this module defines the Flux family (`ACD_FAMILY`: attention modules,
processor, stock check), which the recorder finds from the transformer's class.

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
the mass covers tokens `N_txt .. N_txt + N_img − 1`. Note that a stock pipeline running true CFG (a
negative prompt with `true_cfg_scale > 1`) calls the transformer twice per step: both calls are recorded,
unless the caller marks the unconditional pass with `recorder.conditional_rows(0)`.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from rcgrpo_kernels import acd_attention
from rcgrpo_kernels.acd_attention import acd_attention_eager

from ..acd import ACDFamily, ACDRecorder, Capture


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
# The processor
# ----------------------------------------------------------------------------------------------
class FluxACDAttnProcessor(FluxAttnProcessor):
    """`FluxAttnProcessor` that, inside a capture of its recorder, also records the text→image mass.

    Works in double-stream (`encoder_hidden_states` given) and single-stream blocks. Holds its recorder
    and its execution-order layer index; no global state.
    """

    def __init__(self, recorder: ACDRecorder | None = None, layer_index: int = -1, *,
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
        capture = None if self.recorder is None else self.recorder.capture_for_call()
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
# The family entry of the generic recorder
# ----------------------------------------------------------------------------------------------
def is_stock_processor(processor) -> bool:
    """Whether `processor` computes what diffusers' `FluxAttnProcessor` computes (its `__call__`)."""
    return type(processor).__call__ is FluxAttnProcessor.__call__


ACD_FAMILY = ACDFamily(name="flux", attention_modules=attention_modules, processor_class=FluxACDAttnProcessor,
                       is_stock=is_stock_processor, stock_processor="FluxAttnProcessor")


__all__ = [
    "ACD_FAMILY",
    "ACDRecorder",
    "Capture",
    "FluxACDAttnProcessor",
    "attach_acd",
    "attention_modules",
    "detach_acd",
    "get_acd_recorder",
    "is_stock_processor",
]
