"""Qwen-Image's drop-in ACD attention processor (SPEC §7) and its entry in the ACD recorder's registry.

Every block of `QwenImageTransformer2DModel` is double-stream: its attention joins
`[text (N_txt) | target latents (N_img) | source latents (N_src)]` (the image stream is target then
source, as the edit pipelines concatenate it). ACD's text queries are the text stream, weighted by the
capture's text weights (the instruction's tokens, `text.instruction_weights`); its keys are the target
tokens `N_txt .. N_txt + N_img − 1`, never the source's.

Outside a capture `QwenACDAttnProcessor` *is* diffusers' `QwenDoubleStreamAttnProcessor2_0` (it
delegates to it: identical bits). Inside a capture it computes the same q/k/v (projections, q/k RMS
norms, RoPE, `[text | image]` concatenation) and

- without a text mask: calls `rcgrpo_kernels.acd_attention` for the output and the mass in one pass;
- with `encoder_hidden_states_mask` (padded text, e.g. a batched CFG pass): runs the stock masked
  attention for the output, and `acd_attention` on the recorded rows' `[text | target]` part for the
  mass. a(u) renormalizes text queries over the target keys only, so it does not depend on which text
  keys are masked; padded text queries weigh 0.

Only the recorded rows' mass is kept (`ACDRecorder.conditional_rows`: the conditional rows of a batched
CFG pass; an unconditional pass is not recorded). Calls that need gradients or run under context
parallelism run stock and are counted in `cap.skipped`.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from rcgrpo_kernels import acd_attention
from rcgrpo_kernels.acd_attention import acd_attention_eager

from ..acd import ACDFamily, ACDRecorder, Capture


def attention_modules(transformer) -> list[tuple[str, torch.nn.Module]]:
    """`(name, attention module)` of a Qwen-Image transformer in execution order (its double-stream blocks)."""
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or hasattr(transformer, "single_transformer_blocks"):
        raise TypeError("expected a QwenImageTransformer2DModel with `transformer_blocks`, got "
                        f"{type(transformer).__name__}")
    return [(f"transformer_blocks.{i}.attn", block.attn) for i, block in enumerate(blocks)]


def is_stock_processor(processor) -> bool:
    """Whether `processor` computes what diffusers' `QwenDoubleStreamAttnProcessor2_0` computes."""
    return type(processor).__call__ is QwenDoubleStreamAttnProcessor2_0.__call__


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """q, k, v `[B, N_txt + N_image, H, D]` of the joint sequence `[text | image]`, as the stock processor
    computes them (projections, head split, q/k RMS norms, RoPE)."""
    head_dim = attn.inner_dim // attn.heads
    img = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
    txt = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
           for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
    for tensors, norms in ((img, (attn.norm_q, attn.norm_k)), (txt, (attn.norm_added_q, attn.norm_added_k))):
        for i, norm in enumerate(norms):
            if norm is not None:
                tensors[i] = norm(tensors[i])
    if image_rotary_emb is not None:
        img_freqs, txt_freqs = image_rotary_emb
        for i in (0, 1):
            img[i] = apply_rotary_emb_qwen(img[i], img_freqs, use_real=False)
            txt[i] = apply_rotary_emb_qwen(txt[i], txt_freqs, use_real=False)
    return tuple(torch.cat([t, i], dim=1) for t, i in zip(txt, img))


class QwenACDAttnProcessor(QwenDoubleStreamAttnProcessor2_0):
    """`QwenDoubleStreamAttnProcessor2_0` that, inside a capture of its recorder, also records the
    text→target mass. Holds its recorder and its execution-order layer index; no global state."""

    def __init__(self, recorder: ACDRecorder | None = None, layer_index: int = -1, *, backend: str = "auto",
                 mode: str = "auto"):
        super().__init__()
        self.recorder = recorder
        self.layer_index = layer_index
        self.backend = backend
        self.mode = mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        capture = None if self.recorder is None else self.recorder.capture_for_call()
        stock_args = (attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask,
                      image_rotary_emb)
        if capture is None or encoder_hidden_states is None or attention_mask is not None:
            return super().__call__(*stock_args)  # stock raises for the last two
        reason = self._skip_reason(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if reason is not None:
            capture._skip(reason)
            return super().__call__(*stock_args)
        return self._captured_call(capture, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                   image_rotary_emb)

    def _skip_reason(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        if self._parallel_config is not None:
            return "context_parallel"
        if torch.is_grad_enabled():
            tensors = [hidden_states, encoder_hidden_states]
            if isinstance(image_rotary_emb, (tuple, list)):
                tensors.extend(image_rotary_emb)
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors) or any(
                p.requires_grad for p in attn.parameters()
            ):
                return "grad"
        return None

    def _captured_call(self, capture: Capture, attn, hidden_states, encoder_hidden_states, text_mask,
                       image_rotary_emb):
        layer = self.layer_index
        batch, text_len = encoder_hidden_states.shape[:2]
        image_len = capture.image_len
        capture._text_len_for_call(layer, text_len)
        if hidden_states.shape[1] < image_len:
            raise ValueError(f"ACD capture: attention layer {layer} has {hidden_states.shape[1]} image tokens, fewer "
                             f"than the token mask's image_len={image_len}")
        rows = self.recorder.rows if self.recorder.rows is not None else batch
        if rows > batch:
            raise ValueError(f"ACD capture: {rows} conditional rows marked but attention layer {layer} runs a batch "
                             f"of {batch}")
        capture._check_batch(layer, rows)
        if text_mask is not None:
            text_mask = text_mask.to(torch.bool)
        weights = capture._weights_for_rows(rows, text_len, hidden_states.device, text_mask)

        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        # [B, N, H, D] -> [B, H, N, D] views (unit stride in D): the SDPA layout every acd_attention backend takes.
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        with self.recorder.mark("acd"):
            if text_mask is None:
                full_weights = weights if rows == batch else torch.cat(
                    [weights, weights.new_zeros(batch - rows, text_len)])
                out, mass = self._op(q, k, v, text_len, image_len, full_weights)
                hidden = out.transpose(1, 2).flatten(2, 3)
            else:
                # The output as the stock processor computes it (masked); the mass from the recorded rows'
                # [text | target] part, which does not depend on the text mask.
                joint_mask = torch.cat([text_mask, text_mask.new_ones(batch, hidden_states.shape[1])], dim=1)
                hidden = dispatch_attention_fn(query, key, value, attn_mask=joint_mask[:, None, None, :],
                                               dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                                               parallel_config=self._parallel_config).flatten(2, 3)
                end = text_len + image_len
                _, mass = self._op(q[:rows, :, :end], k[:rows, :, :end], v[:rows, :, :end], text_len, image_len,
                                   weights)
        capture._record(layer, mass[:rows])

        hidden = hidden.to(query.dtype)
        txt_out, img_out = hidden[:, :text_len], hidden[:, text_len:]
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        return img_out, txt_out

    def _op(self, q, k, v, text_len, image_len, weights):
        if self.mode == "eager":
            return acd_attention_eager(q, k, v, text_len, image_len, text_weights=weights)
        return acd_attention(q, k, v, text_len, image_len, text_weights=weights, backend=self.backend, mode=self.mode)


ACD_FAMILY = ACDFamily(name="qwen-image", attention_modules=attention_modules, processor_class=QwenACDAttnProcessor,
                       is_stock=is_stock_processor, stock_processor="QwenDoubleStreamAttnProcessor2_0")


__all__ = ["ACD_FAMILY", "QwenACDAttnProcessor", "attention_modules", "is_stock_processor", "joint_qkv"]
