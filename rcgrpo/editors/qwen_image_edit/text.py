"""Qwen-Image-Edit's text conditions: the vision-language prompt embeddings, and which of their positions
hold the instruction (SPEC §7: the ACD text weights w_v).

The pipelines put the instruction into a chat template and encode it with Qwen2.5-VL together with the
source image (`encode_prompt`); the first `prompt_template_encode_start_idx` (64) tokens — the system
prompt — are dropped, so the text stream is

    QwenImageEditPipeline      <|vision_start|> <|image_pad|>×N <|vision_end|> INSTRUCTION <closing>
    QwenImageEditPlusPipeline  Picture 1: <|vision_start|> <|image_pad|>×N <|vision_end|> INSTRUCTION <closing>

(<closing> = `<|im_end|> \\n <|im_start|> assistant \\n`, 5 tokens with the real tokenizer)

`instruction_weights` finds the instruction's positions by tokenizing: it runs the pipeline's own
processor on the same text with character offsets and marks the tokens inside the instruction's
characters (located from the end of the text: the template's closing part follows it). It then checks
that those tokens decode to the instruction and that the token count matches the embeddings. No
position is hard-coded.
"""
from __future__ import annotations

import unicodedata
import warnings
from dataclasses import dataclass, replace

import torch

ACD_TEXT_TOKENS = ("prompt", "all")
MAX_SEQUENCE_LENGTH = 1024  # the pipelines refuse more (`check_inputs`)
# QwenImageEditPlusPipeline's per-image prefix of the instruction
PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class QwenTextConditions:
    """The text conditions of one edit (batch 1)."""

    prompt_embeds: torch.Tensor  # [1, N_txt, C_txt] the instruction's template, system prompt dropped
    negative_embeds: torch.Tensor | None  # [1, N_neg, C_txt] the negative prompt's (true CFG), or None
    acd_weights: torch.Tensor | None  # [N_txt] float32: 1 on the instruction's own tokens; None = every position
    instruction: str  # the instruction as encoded (truncated to max_sequence_length tokens)
    negative_prompt: str | None
    vl_size: tuple[int, int]  # (height, width) of the image the vision-language encoder was given

    @property
    def text_len(self) -> int:
        return self.prompt_embeds.shape[1]

    def to(self, device=None, dtype=None) -> "QwenTextConditions":
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, prompt_embeds=move(self.prompt_embeds), negative_embeds=move(self.negative_embeds))


def check_instruction(pipe, instruction) -> None:
    """ValueError unless `instruction` is a non-empty string free of the template's special tokens."""
    if not isinstance(instruction, str):
        raise ValueError(f"instruction must be a string, got {type(instruction).__name__}")
    if not instruction.strip():
        raise ValueError("instruction is empty: it has no tokens for the editor (or ACD) to use")
    for token in pipe.tokenizer.added_tokens_decoder.values():
        content = getattr(token, "content", str(token))
        if content and content in instruction:
            raise ValueError(f"instruction {instruction[:60]!r} contains the special token {content!r} of the "
                             "Qwen chat template; remove it")


def truncate_instruction(tokenizer, instruction: str, max_tokens: int) -> str:
    """`instruction` cut at a token boundary so that it tokenizes to at most `max_tokens` tokens."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be an int in 1..{MAX_SEQUENCE_LENGTH} (the instruction's tokens "
                         f"for Qwen-Image-Edit), got {max_tokens!r}")
    text = instruction
    while True:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= max_tokens:
            break
        text = text[: offsets[max_tokens][0]]  # re-tokenized: a cut word may split into more tokens
    if text != instruction:
        warnings.warn(f"instruction truncated to {max_tokens} tokens (max_sequence_length): {text!r}", stacklevel=3)
    return text


def template_text(pipe, instruction: str, num_images: int = 1) -> str:
    """The text the pipeline's `_get_qwen_prompt_embeds` tokenizes for `instruction`."""
    prefix = ""
    if _is_plus(pipe):
        prefix = "".join(PLUS_IMAGE_PROMPT.format(i + 1) for i in range(num_images))
    return pipe.prompt_template_encode.format(prefix + instruction)


def instruction_weights(pipe, instruction: str, vl_images, text_len: int) -> torch.Tensor:
    """`[text_len]` float32: 1 on the positions of the prompt embeddings that hold `instruction`'s tokens.

    `vl_images` is the image (Plus: the list of images) the pipeline's encoder was given; `text_len` the
    length of the embeddings it returned (checked against the tokenization)."""
    text = template_text(pipe, instruction, len(vl_images) if isinstance(vl_images, list) else 1)
    enc = pipe.processor(text=[text], images=vl_images, padding=True, return_tensors="pt",
                         return_offsets_mapping=True)
    offsets = enc["offset_mapping"][0]
    ids = enc["input_ids"][0]
    drop = pipe.prompt_template_encode_start_idx
    if ids.shape[0] - drop != text_len:
        raise RuntimeError(f"the template tokenizes to {ids.shape[0]} tokens ({drop} dropped), but the pipeline's "
                           f"prompt embeddings have {text_len}: cannot locate the instruction's tokens")
    closing = pipe.prompt_template_encode.split("{}")[-1]
    end = int(offsets[-1, 1]) - len(closing)  # character span of the instruction in the processed text
    start = end - len(instruction)
    inside = (offsets[:, 0] < end) & (offsets[:, 1] > start)
    positions = torch.nonzero(inside).flatten()
    decoded = pipe.tokenizer.decode(ids[positions])
    if positions.numel() == 0 or int(positions[0]) < drop or decoded != unicodedata.normalize("NFC", instruction):
        raise RuntimeError(f"could not locate the instruction {instruction[:60]!r} in the Qwen template tokens "
                           f"(found {decoded[:60]!r} at positions {positions.tolist()[:8]}...)")
    weights = torch.zeros(text_len, dtype=torch.float32)
    weights[positions - drop] = 1.0
    return weights


@torch.no_grad()
def encode_text(pipe, instruction: str, vl_images, *, max_sequence_length: int, acd_text_tokens: str = "prompt",
                negative_prompt: str | None = None, vl_size: tuple[int, int], device=None) -> QwenTextConditions:
    """The pipeline's own `encode_prompt` of `instruction` (and of `negative_prompt`) with `vl_images` as the
    vision-language input, and the ACD weights of the instruction's tokens (`acd_text_tokens="prompt"`;
    "all" weighs every position: None)."""
    if acd_text_tokens not in ACD_TEXT_TOKENS:
        raise ValueError(f"acd_text_tokens must be one of {ACD_TEXT_TOKENS}, got {acd_text_tokens!r}")
    check_instruction(pipe, instruction)
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise ValueError(f"negative_prompt must be a string or None, got {type(negative_prompt).__name__}")
    instruction = truncate_instruction(pipe.tokenizer, instruction, max_sequence_length)
    device = device if device is not None else pipe.text_encoder.device
    embeds, mask = pipe.encode_prompt(prompt=instruction, image=vl_images, device=device)
    negative = None
    if negative_prompt is not None:
        negative, negative_mask = pipe.encode_prompt(prompt=negative_prompt, image=vl_images, device=device)
        if negative_mask is not None and not bool(negative_mask.all()):
            raise RuntimeError("the negative prompt's embeddings came back padded for a batch of one")
    if mask is not None and not bool(mask.all()):
        raise RuntimeError("the prompt embeddings came back padded for a batch of one")
    weights = None
    if acd_text_tokens == "prompt":
        weights = instruction_weights(pipe, instruction, vl_images, embeds.shape[1])
    return QwenTextConditions(prompt_embeds=embeds, negative_embeds=negative, acd_weights=weights,
                              instruction=instruction, negative_prompt=negative_prompt, vl_size=tuple(vl_size))


def _is_plus(pipe) -> bool:
    return any(cls.__name__ == "QwenImageEditPlusPipeline" for cls in type(pipe).__mro__)


__all__ = ["ACD_TEXT_TOKENS", "MAX_SEQUENCE_LENGTH", "QwenTextConditions", "check_instruction", "encode_text",
           "instruction_weights", "template_text", "truncate_instruction"]
