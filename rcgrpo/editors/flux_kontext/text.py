"""The instruction's conditioning: prompt embeddings as the pipeline computes them, and which T5
positions hold the instruction (SPEC §7: the text weights w_v of ACD).

FluxKontextPipeline pads the T5 prompt to `max_sequence_length` (512 for FLUX.1) with
`padding="max_length", truncation=True`; the padding positions are not text. `prompt_token_mask`
tokenizes exactly as the pipeline does and returns its attention mask: 1 on the instruction's real
tokens (end-of-sequence included), 0 on padding.
"""
from __future__ import annotations

import torch

ACD_TEXT_TOKENS = ("prompt", "all")


def prompt_token_mask(pipe, prompt: str, max_sequence_length: int) -> torch.Tensor:
    """`[max_sequence_length]` float32: the T5 attention mask of `prompt` as the pipeline pads it."""
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if tokenizer is None:
        raise ValueError("the pipeline has no T5 tokenizer (tokenizer_2), so the instruction's tokens are unknown; "
                         "use acd_text_tokens='all' or pass the token mask with the embeddings")
    enc = tokenizer(prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                    return_length=False, return_overflowing_tokens=False, return_tensors="pt")
    return enc.attention_mask[0].to(torch.float32)


@torch.no_grad()
def encode_prompt(pipe, prompt: str, max_sequence_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds `[1, N_txt, C]`, pooled_prompt_embeds `[1, C_pool]`) from the pipeline's own encoders."""
    embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                           max_sequence_length=max_sequence_length)
    return embeds, pooled


def acd_text_weights(pipe, prompt: str, max_sequence_length: int, mode: str) -> torch.Tensor | None:
    """The ACD text weights for `mode`: the prompt's token mask ("prompt"), or None (every position, "all")."""
    if mode not in ACD_TEXT_TOKENS:
        raise ValueError(f"acd_text_tokens must be one of {ACD_TEXT_TOKENS}, got {mode!r}")
    return prompt_token_mask(pipe, prompt, max_sequence_length) if mode == "prompt" else None


__all__ = ["ACD_TEXT_TOKENS", "acd_text_weights", "encode_prompt", "prompt_token_mask"]
