"""The tiny MiniBench editor: a FLUX.1-Kontext architecture small enough for CPU RL.

Components (all stock diffusers / transformers classes, so `FluxKontextPipeline.from_pretrained` loads
the saved directory with no custom code):

- `AutoencoderKL`, 3 levels (factor 4): 64×64 px ↔ 16×16×8 latents; Flux packs 2×2 latent patches,
  so an image is 8×8 = 64 tokens of 32 channels.
- `FluxTransformer2DModel`: 2 double-stream + 4 single-stream blocks, 4 heads × 16 (hidden 64),
  RoPE axes (4, 6, 6), guidance embedding.
- `T5EncoderModel` (2 layers, d_model 64) with a word-level Unigram `T5TokenizerFast`: one piece per
  MiniBench word (`tasks.VOCABULARY`), character pieces as a fallback for other text.
- `CLIPTextModel` (1 layer, hidden 32) with a character-level CLIP tokenizer (the vocabulary of `rcgrpo.testing`'s)
  (its pooled output conditions the transformer's modulation, as in FLUX.1).

`EditorConfig` holds the sizes; `build_editor(config, seed)` returns a randomly initialised pipeline in
eval mode (pretraining starts from it); `load_editor(path, device, dtype)` loads a saved one.
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .tasks import VOCABULARY

EDITOR_RESOLUTION = 64
EDITOR_TEXT_LEN = 32  # max_sequence_length the editor is used with (it is trained on 16..64)
EDITOR_STEPS = 8  # Euler steps the editor is evaluated with
TINY_EDITOR_PATH = Path(__file__).resolve().parent / "weights" / "tiny-editor"  # the shipped weights


@dataclass
class EditorConfig:
    """Sizes of the tiny editor's components."""

    resolution: int = field(default=EDITOR_RESOLUTION, metadata={"help": "image side in pixels"})
    vae_channels: tuple = field(default=(16, 32, 64), metadata={"help": "VAE block widths; len = levels (factor 2^(len-1))"})
    vae_layers_per_block: int = field(default=1, metadata={"help": "ResNet layers per VAE block"})
    latent_channels: int = field(default=8, metadata={"help": "VAE latent channels (packed tokens have 4x as many)"})
    vae_norm_groups: int = field(default=8, metadata={"help": "GroupNorm groups in the VAE"})
    num_layers: int = field(default=2, metadata={"help": "double-stream transformer blocks"})
    num_single_layers: int = field(default=4, metadata={"help": "single-stream transformer blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    head_dim: int = field(default=16, metadata={"help": "attention head dimension (RoPE axes sum to it)"})
    rope_axes: tuple = field(default=(4, 6, 6), metadata={"help": "RoPE dims per position axis (image index, row, column)"})
    t5_dim: int = field(default=64, metadata={"help": "T5 d_model (= the transformer's joint_attention_dim)"})
    t5_layers: int = field(default=2, metadata={"help": "T5 encoder layers"})
    t5_heads: int = field(default=4, metadata={"help": "T5 attention heads"})
    clip_dim: int = field(default=32, metadata={"help": "CLIP text hidden size (= pooled_projection_dim)"})
    clip_layers: int = field(default=1, metadata={"help": "CLIP text encoder layers"})

    def validate(self) -> "EditorConfig":
        levels = len(self.vae_channels)
        if levels < 1:
            raise ValueError("vae_channels must name at least one level")
        factor = 2 ** (levels - 1) * 2
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} must be a multiple of {factor} (VAE factor × 2×2 packing)")
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope_axes {tuple(self.rope_axes)} must sum to head_dim {self.head_dim}")
        if any(c % self.vae_norm_groups for c in self.vae_channels):
            raise ValueError(f"vae_channels {tuple(self.vae_channels)} must be multiples of vae_norm_groups {self.vae_norm_groups}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vae_channels"], d["rope_axes"] = list(self.vae_channels), list(self.rope_axes)
        return d


def editor_t5_tokenizer():
    """Word-level T5 tokenizer: `▁<word>` pieces for every MiniBench word, then characters (fallback)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in VOCABULARY]
    pieces.append(("▁", -8.0))
    seen = {p for p, _ in pieces}
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        if ch not in seen:
            pieces.append((ch, -10.0))
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0)
    tok.model_max_length = 512
    return tok


def editor_clip_tokenizer():
    """Character-level CLIP tokenizer (byte-level pieces, no merges, 77 positions), the same as
    `rcgrpo.testing.tiny_clip_tokenizer`."""
    from .tokenizers import char_clip_tokenizer

    return char_clip_tokenizer(77)


def scheduler():
    """FLUX.1's FlowMatchEulerDiscreteScheduler settings (dynamic resolution shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def build_vae(config: EditorConfig):
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_channels),
        layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups,
        sample_size=config.resolution,
        shift_factor=0.0,
        scaling_factor=1.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_transformer(config: EditorConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * config.latent_channels,
        out_channels=None,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.t5_dim,
        pooled_projection_dim=config.clip_dim,
        axes_dims_rope=list(config.rope_axes),
        guidance_embeds=True,
    )


def build_text_encoders(config: EditorConfig, clip_tok, t5_tok):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=config.clip_dim,
        intermediate_size=2 * config.clip_dim,
        num_hidden_layers=config.clip_layers,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=config.clip_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tok),
        d_model=config.t5_dim,
        d_kv=config.t5_dim // config.t5_heads,
        d_ff=2 * config.t5_dim,
        num_layers=config.t5_layers,
        num_heads=config.t5_heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    ))
    return clip, t5


def build_editor(config: EditorConfig | None = None, seed: int = 0):
    """A randomly initialised editor pipeline (eval mode, progress bar off), deterministic in `seed`."""
    from diffusers import FluxKontextPipeline

    config = (config or EditorConfig()).validate()
    clip_tok, t5_tok = editor_clip_tokenizer(), editor_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = build_vae(config)
        transformer = build_transformer(config)
        clip, t5 = build_text_encoders(config, clip_tok, t5_tok)
    for module in (vae, transformer, clip, t5):
        module.eval()
        module.requires_grad_(False)
    pipe = FluxKontextPipeline(scheduler=scheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                               text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """diffusers ≥ 0.42 takes `dtype=`, earlier releases `torch_dtype=`."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_editor(path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """`FluxKontextPipeline.from_pretrained(path)` offline in `dtype`, every module in eval mode, progress bar off."""
    from diffusers import FluxKontextPipeline

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"no tiny editor weights at {str(path)!r} (model_index.json missing); train them with "
            "`rcgrpo pretrain-tiny` (rcgrpo.minibench.pretrain.run_pretrain)"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    pipe = FluxKontextPipeline.from_pretrained(str(path), local_files_only=True, **_dtype_kwarg(dtype))
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        module.eval()
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tiny_editor_defaults():
    """The `ModelDefaults` of the shipped tiny editor (64 px, 8 steps, 32 T5 tokens, guidance 2.5)."""
    from ..editors.base import ModelDefaults

    return ModelDefaults(resolution=EDITOR_RESOLUTION, num_inference_steps=EDITOR_STEPS,
                         max_sequence_length=EDITOR_TEXT_LEN, guidance_scale=2.5)


def shipped_tiny_editor(device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The shipped tiny editor as an `Editor` (`--model tiny-editor`); `seed` is unused (trained weights)."""
    from ..editors.loading import editor_for_pipeline

    return editor_for_pipeline(load_editor(TINY_EDITOR_PATH, device=device, dtype=dtype), tiny_editor_defaults())

