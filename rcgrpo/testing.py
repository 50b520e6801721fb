"""A tiny, randomly initialised, fully offline FluxKontextPipeline for tests and demos.

Every component is built from a config in code (no files, no hub): a 2+2-block Flux transformer,
a two-level AutoencoderKL, tiny CLIP and T5 text encoders with in-code vocabularies. All modules
are put in eval mode (constructors leave them in train mode, and T5 dropout would make runs differ).

`tiny_editor()` loads the pretrained tiny MiniBench editor shipped in the package
(`TINY_EDITOR_PATH`, trained by `rcgrpo.minibench.pretrain`): it edits 64×64 images
(`TINY_EDITOR_RESOLUTION`) with prompts of up to `TINY_EDITOR_TEXT_LEN` T5 tokens.
"""
from __future__ import annotations

import functools
import string
from pathlib import Path

import torch

from .editors.base import ModelDefaults
from .minibench.editor import EDITOR_RESOLUTION as TINY_EDITOR_RESOLUTION  # noqa: F401 - public names
from .minibench.editor import EDITOR_STEPS as TINY_EDITOR_STEPS  # noqa: F401
from .minibench.editor import EDITOR_TEXT_LEN as TINY_EDITOR_TEXT_LEN  # noqa: F401
from .minibench.editor import TINY_EDITOR_PATH, tiny_editor_defaults

TINY_TEXT_LEN = 16  # T5 tokens used by the tiny pipeline (max_sequence_length)
TINY_DEFAULTS = ModelDefaults(resolution=32, num_inference_steps=4, max_sequence_length=TINY_TEXT_LEN)
TINY_EDITOR_DEFAULTS = tiny_editor_defaults()
# The tiny Qwen-Image-Edit pipelines: 64 px, 4 steps, true CFG 4 with the negative prompt " ", the source
# encoded at 64² px (the stock pipelines' 1024² source takes seconds per VAE call on a CPU).
TINY_QWEN_DEFAULTS = ModelDefaults(resolution=64, num_inference_steps=4, max_sequence_length=64, guidance_scale=4.0,
                                   negative_prompt=" ")
TINY_QWEN_SOURCE_AREA = 64 * 64


def tiny_clip_tokenizer():
    """The character-level CLIP tokenizer of the tiny pipelines (77 positions)."""
    from .minibench.tokenizers import char_clip_tokenizer

    return char_clip_tokenizer(77)


def tiny_t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        pieces.append((ch, -3.0))
        pieces.append(("▁" + ch, -3.5))
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def tiny_kontext_pipeline(seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A FluxKontextPipeline with tiny random weights: 2 double + 2 single blocks, 2 heads × 16.

    At 32×32 px the target image is 8×8 = 64 tokens of C = 16 channels (VAE factor 2, 2×2 packing),
    the context image another 64, the text TINY_TEXT_LEN tokens. Deterministic in `seed`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = tiny_clip_tokenizer()
    t5_tok = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            out_channels=None,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            shift_factor=0.0,
            scaling_factor=1.0,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                dropout_rate=0.0,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
        module.requires_grad_(False)
    pipe = FluxKontextPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        pipe = pipe.to(device=device, dtype=dtype)
    return pipe


def tiny_editor(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, path=None):
    """The pretrained tiny MiniBench editor: a stock `FluxKontextPipeline.from_pretrained(TINY_EDITOR_PATH)`
    (offline) in `dtype` on `device`, every module in eval mode, progress bar off.

    A 64×64 px Kontext model (VAE factor 4, 8×8 = 64 tokens of 32 channels, 2 double + 4 single blocks,
    hidden 64); use `height=width=TINY_EDITOR_RESOLUTION`, `max_sequence_length=TINY_EDITOR_TEXT_LEN`,
    `max_area=64*64, _auto_resize=False`. `path` loads another directory of the same format.
    """
    from .minibench.editor import load_editor

    return load_editor(TINY_EDITOR_PATH if path is None else path, device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# A tiny Qwen-Image-Edit pipeline (both the 2508 and the Plus / 2509+ pipeline classes)
# ------------------------------------------------------------------------------------------------
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
# Words (besides the pipelines' own template) that the tiny Qwen tokenizer keeps whole, so instructions
# have multi-character tokens: each with and without a leading space.
QWEN_TINY_WORDS = ("make the hat red blue green yellow add a an remove replace with turn change into cat dog sky "
                   "background sign says it and of to Picture image")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE of one pre-token with merge ranks (the lowest-ranked adjacent pair merges first)."""
    pieces = list(word)
    while len(pieces) > 1:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(pieces, pieces[1:])) if pair in ranks]
        if not ranked:
            break
        _, i = min(ranked)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _qwen_tokenizer_files(folder: Path, templates: list[str]) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json of a tiny byte-level Qwen2 BPE tokenizer.

    The vocabulary is the 256 byte-level characters, one merged token for every pre-token of the
    pipelines' templates (so the system prompt is exactly as many tokens as its pre-tokens, 64 for the
    diffusers templates, as with the real tokenizer) and of `QWEN_TINY_WORDS`, and the special tokens.
    """
    import json
    import re

    from transformers import Qwen2Tokenizer

    from .minibench.tokenizers import byte_level_alphabet

    vocab = {ch: i for i, ch in enumerate(byte_level_alphabet())}
    pre_tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer
    specials = "|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS)
    texts = [part for t in templates for part in re.split(specials, t.replace("{}", " "))]
    texts += [prefix + word for word in QWEN_TINY_WORDS.split() for prefix in ("", " ")]
    ranks: dict[tuple[str, str], int] = {}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            pieces = _bpe(word, ranks)
            while len(pieces) > 1:  # merge the first two pieces until the pre-token is one token
                ranks[(pieces[0], pieces[1])] = len(ranks)
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
                pieces = _bpe(word, ranks)
    added = {}
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
        added[str(vocab[token])] = {"content": token, "special": True, "lstrip": False, "rstrip": False,
                                    "normalized": False, "single_word": False}
    merges = sorted(ranks, key=ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 32768, "errors": "replace",
              "clean_up_tokenization_spaces": False, "split_special_tokens": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def tiny_qwen_tokenizer():
    """The tiny Qwen2 BPE tokenizer of `tiny_qwen_edit_pipeline` (files written to a temporary folder and
    loaded with `Qwen2Tokenizer.from_pretrained`, which reads them completely)."""
    import tempfile

    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from transformers import Qwen2Tokenizer

    templates = []
    for cls in (QwenImageEditPipeline, QwenImageEditPlusPipeline):
        empty = cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
        templates.append(empty.prompt_template_encode)
    with tempfile.TemporaryDirectory(prefix="rcgrpo-qwen-tokenizer-") as folder:
        _qwen_tokenizer_files(Path(folder), templates)
        return Qwen2Tokenizer.from_pretrained(folder)


@functools.cache
def _qwen_vl_processor_class():
    """`Qwen2VLProcessor` with an image processor and a tokenizer only: the stock class also wants a video
    processor, which needs torchvision (not installed here)."""
    from transformers import Qwen2VLProcessor

    class TinyQwenVLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    return TinyQwenVLProcessor


def tiny_qwen_edit_pipeline(seed: int = 0, *, plus: bool = False, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu"):
    """A `QwenImageEditPipeline` (`plus=True`: `QwenImageEditPlusPipeline`) with tiny random weights.

    Transformer: 2 double-stream blocks, 2 heads × 16, packed latents of C = 16 channels (VAE z = 4,
    2×2 patches), text width 16. VAE: factor 8 (a 64×64 px edit is 4×4 = 16 target tokens). Text
    encoder: a 2-layer Qwen2.5-VL (hidden 16) with a 2-block vision tower; the image processor keeps
    4..16 vision tokens per image. The scheduler is Qwen-Image's (exponential time shift, shift
    terminal 0.02). The tokenizer (`tiny_qwen_tokenizer`) and processor are built in code; every module is in
    eval mode with gradients off. Deterministic in `seed`.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_qwen_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text_config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=16, num_attention_heads=2,
                                                  joint_attention_dim=16, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                time_shift_type="exponential", use_dynamic_shifting=True)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    processor = _qwen_vl_processor_class()(image_processor=image_processor, tokenizer=tokenizer)
    for module in (transformer, vae, text_encoder):
        module.eval()
        module.requires_grad_(False)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        pipe = pipe.to(device=device, dtype=dtype)
    return pipe


# ------------------------------------------------------------------------------------------------
# The offline models by name (`--model tiny`, `tiny-qwen`, `tiny-qwen-plus`)
# ------------------------------------------------------------------------------------------------
def tiny_kontext_editor(device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """`tiny_kontext_pipeline(seed)` as an Editor with `TINY_DEFAULTS` (`--model tiny`)."""
    from .editors.flux_kontext import FluxKontextEditor

    return FluxKontextEditor(tiny_kontext_pipeline(seed, dtype=dtype, device=device), TINY_DEFAULTS)


def tiny_qwen_editor(device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0, *, plus: bool = False):
    """`tiny_qwen_edit_pipeline(seed, plus=plus)` as an Editor with `TINY_QWEN_DEFAULTS`, the source encoded at
    `TINY_QWEN_SOURCE_AREA` (`--model tiny-qwen` / `tiny-qwen-plus`)."""
    from .editors.qwen_image_edit import QwenImageEditor

    pipe = tiny_qwen_edit_pipeline(seed, plus=plus, dtype=dtype, device=device)
    return QwenImageEditor(pipe, TINY_QWEN_DEFAULTS, source_area=TINY_QWEN_SOURCE_AREA,
                           condition_area=TINY_QWEN_SOURCE_AREA)


def _register() -> None:
    from .editors.loading import register_model

    register_model("tiny", tiny_kontext_editor, TINY_DEFAULTS, "FluxKontextPipeline",
                   "random tiny FLUX.1-Kontext pipeline (tests)")
    register_model("tiny-qwen", tiny_qwen_editor, TINY_QWEN_DEFAULTS, "QwenImageEditPipeline",
                   "random tiny Qwen-Image-Edit pipeline (tests)")
    register_model("tiny-qwen-plus", lambda device="cpu", dtype=torch.float32, seed=0: tiny_qwen_editor(
        device, dtype, seed, plus=True), TINY_QWEN_DEFAULTS, "QwenImageEditPlusPipeline",
        "random tiny Qwen-Image-Edit-Plus pipeline (tests)")


_register()

