"""A tiny, randomly initialised, fully offline FluxKontextPipeline for tests and demos.

Every component is built from a config in code (no files, no hub): a 2+2-block Flux transformer,
a two-level AutoencoderKL, tiny CLIP and T5 text encoders with in-code vocabularies. All modules
are put in eval mode (constructors leave them in train mode, and T5 dropout would make runs differ).

`tiny_editor()` loads the pretrained tiny MiniBench editor shipped in the package
(`TINY_EDITOR_PATH`, trained by `rcgrpo.minibench.pretrain`): it edits 64×64 images
(`TINY_EDITOR_RESOLUTION`) with prompts of up to `TINY_EDITOR_TEXT_LEN` T5 tokens.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

TINY_TEXT_LEN = 16  # T5 tokens used by the tiny pipeline (max_sequence_length)
TINY_EDITOR_PATH = Path(__file__).resolve().parent / "minibench" / "weights" / "tiny-editor"
TINY_EDITOR_RESOLUTION = 64  # the tiny editor's image side in pixels
TINY_EDITOR_TEXT_LEN = 32  # max_sequence_length for the tiny editor (it was trained on 16..64)
TINY_EDITOR_STEPS = 8  # Euler steps the tiny editor is evaluated with


def __getattr__(name):
    # TINY_EDITOR_DEFAULTS: the rcgrpo.flux.pipeline.ModelDefaults of the tiny editor (imported lazily, so
    # that importing rcgrpo.testing stays light and free of import cycles)
    if name == "TINY_EDITOR_DEFAULTS":
        from .flux.defaults import ModelDefaults

        return ModelDefaults(resolution=TINY_EDITOR_RESOLUTION, num_inference_steps=TINY_EDITOR_STEPS,
                             max_sequence_length=TINY_EDITOR_TEXT_LEN, guidance_scale=2.5)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tiny_clip_tokenizer():
    """The character-level CLIP tokenizer of the tiny pipelines (77 positions)."""
    from .flux.tokenizers import char_clip_tokenizer

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
