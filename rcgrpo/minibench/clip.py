"""The tiny MiniBench CLIP: a transformers `CLIPModel` trained contrastively on MiniBench local crops.

It gives `rcgrpo eval --clip-model tiny-clip` (and `ClipEncoder("tiny-clip")`, `ClipLocalTextReward`)
LC-T and LC-I values that mean something on MiniBench, offline. The shipped weights live in
`rcgrpo/minibench/weights/tiny-clip/` in `save_pretrained` format (config.json, model.safetensors,
the tokenizer files and a `preprocessor_config.json` that `ClipEncoder` reads: image size, mean, std);
`rcgrpo.io.hub.SHIPPED_MODELS` maps the name "tiny-clip" to that folder.

- Towers: a ViT (image 32×32 px, patches 4×4, width 64, 3 layers) and a text transformer (width 64,
  2 layers, 32 positions), projections to 64 dims; 0.23 M parameters (0.92 MB of safetensors, fp32).
- Tokenizer: `clip_tokenizer()`, a `CLIPTokenizer` built in code whose BPE merges make every MiniBench
  word (`tasks.VOCABULARY`) a single token; the 256 byte-level characters (with and without `</w>`)
  stay in the vocabulary as a fallback for other text. The merges are learned from the vocabulary by
  `_learn_merges` (plain BPE with a fixed tie-break: the `tokenizers` trainer breaks ties in a different
  order from run to run, which would change the token ids).
- Data: MiniBench's train split only (`example_seed(seed, "train", i)`). Each example gives up to three
  (crop, caption) pairs: the ground-truth edit's crop with `example.caption`; the source's crop with the
  caption of what it shows (the removed / replaced object, or the background for add): the hard
  negative of the edit; and, for add / replace, the crop of a wrong edit (`tasks.render_edit` with
  another colour or shape) with its own caption. Crops are taken as `rcgrpo eval` takes them
  (`eval_crop`: image and mask resized to 512 px, PIL crop of the mask box) or as the trainer's LC-T
  reward takes them (the mask's box at the native size), with a jitter of the box, then preprocessed by
  `rewards.clip.clip_preprocess` (what `ClipEncoder` does; `rcgrpo eval` resizes the 8-bit crop with
  PIL instead, `eval.clip_official`, which this model sees as a small perturbation: see the numbers in
  tests/test_tiny_clip.py and the issue's report).
- Loss: symmetric InfoNCE between the batch's crops and the distinct captions present in the batch
  (image → text: one positive; text → image: the images of that caption share the target), learnable
  temperature, AdamW with warmup and cosine decay.

Reproduce the shipped weights bit for bit (CPU, one thread; 25-31 minutes on the shared 2-core machine:
2-3 minutes of data, 3000 steps of 0.45-0.6 s):

    python -m rcgrpo.minibench.clip --output_dir rcgrpo/minibench/weights/tiny-clip

It ends by printing `heldout_scores` (shipped: top-1 0.893 over the 35 captions, chance 0.029; measured on
the odd-seed held-out split before it was divided into val and test).

API: `TinyClipConfig`, `train_tiny_clip(config) -> Path`, `tiny_clip(device=None, path=None) -> ClipEncoder`,
`clip_tokenizer()`, `build_tiny_clip(config)`, `contrastive_loss(...)`, `TINY_CLIP_PATH`; from
`rcgrpo.minibench.clip_data` (re-exported here): `all_captions()`, `eval_crop(image, mask)`,
`native_crop(image, mask)`, `build_training_set(config)`, `heldout_scores(encoder, ...)`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..io.files import atomic_directory, atomic_write_text
from ..rewards.clip import CLIP_MEAN, CLIP_STD, ClipEncoder
from .clip_data import EVAL_CROP_SIZE, all_captions, build_training_set, eval_crop, heldout_scores, native_crop
from .tasks import VOCABULARY

TINY_CLIP_PATH = Path(__file__).resolve().parent / "weights" / "tiny-clip"
TRAINING_FILE = "training.json"


@dataclass
class TinyClipConfig:
    """Architecture, data and optimisation of the tiny CLIP (the defaults made the shipped weights)."""

    seed: int = field(default=0, metadata={"help": "seed of the initialisation, the batches and the augmentation"})
    data_seed: int = field(default=0, metadata={"help": "base seed of the MiniBench train-split examples"})
    output_dir: str = field(default=str(TINY_CLIP_PATH), metadata={"help": "where the save_pretrained folder goes"})
    # architecture
    image_size: int = field(default=32, metadata={"help": "vision tower input size (crops are resized to it)"})
    patch_size: int = field(default=4, metadata={"help": "ViT patch size"})
    vision_width: int = field(default=64, metadata={"help": "vision tower hidden size"})
    vision_layers: int = field(default=3, metadata={"help": "vision tower layers"})
    text_width: int = field(default=64, metadata={"help": "text tower hidden size"})
    text_layers: int = field(default=2, metadata={"help": "text tower layers"})
    heads: int = field(default=4, metadata={"help": "attention heads in both towers"})
    max_text_len: int = field(default=32, metadata={"help": "text positions (tokenizer model_max_length)"})
    projection_dim: int = field(default=64, metadata={"help": "shared embedding size"})
    # data
    train_examples: int = field(default=15000, metadata={"help": "MiniBench train-split examples (tasks round robin)"})
    render_sizes: list[int] = field(default_factory=lambda: [32, 64],
                                    metadata={"help": "image sizes examples are rendered at (cycled)"})
    source_crops: bool = field(default=True, metadata={"help": "add the source crop with its own caption (hard negative)"})
    wrong_edit_crops: bool = field(default=True, metadata={"help": "add a wrong-colour/shape edit's crop with its caption"})
    eval_path_fraction: float = field(default=0.5, metadata={"help": "share of crops taken as `rcgrpo eval` does (512 px)"})
    box_jitter: int = field(default=1, metadata={"help": "max shift of each box edge, in native pixels"})
    # optimisation
    steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=256, metadata={"help": "crops per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on norms, biases, embeddings)"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warmup steps, then cosine decay to 0"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    log_every: int = field(default=100, metadata={"help": "log every N steps"})

    def validate(self) -> "TinyClipConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        for name in ("vision_width", "text_width"):
            if getattr(self, name) % self.heads:
                raise ValueError(f"{name} {getattr(self, name)} must be a multiple of heads {self.heads}")
        for name in ("steps", "batch_size", "train_examples", "threads", "log_every", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.eval_path_fraction <= 1.0:
            raise ValueError(f"eval_path_fraction must be in [0, 1], got {self.eval_path_fraction}")
        if not self.render_sizes or any(int(s) < 16 for s in self.render_sizes):
            raise ValueError(f"render_sizes must be sizes ≥ 16 px, got {self.render_sizes!r}")
        if self.box_jitter < 0:
            raise ValueError(f"box_jitter must be ≥ 0, got {self.box_jitter}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["render_sizes"] = [int(s) for s in self.render_sizes]
        return d


# ----------------------------------------------------------------------------------------------------
# Tokenizer and model
# ----------------------------------------------------------------------------------------------------


def _learn_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges that join every word of `words` into one `word</w>` symbol: repeatedly merge the most
    frequent adjacent pair (ties: the lexicographically smallest pair), each word counted once."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for k, seq in enumerate(seqs):
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[k] = out


def clip_tokenizer(max_length: int = 32):
    """The tiny CLIP's tokenizer: `CLIPTokenizer` whose merges make each MiniBench word one token.

    Ids: 0 `<|startoftext|>`, 1 `<|endoftext|>` (also padding and unknown), then the byte-level
    characters, each alone and with `</w>`, then the merged symbols in merge order.
    """
    from transformers import CLIPTokenizer

    from .tokenizers import byte_level_vocab

    vocab = byte_level_vocab()
    merges = _learn_merges(VOCABULARY)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges))
    tok.model_max_length = int(max_length)
    return tok


def build_tiny_clip(config: TinyClipConfig | None = None, vocab_size: int | None = None):
    """A randomly initialised `CLIPModel` of `config`'s sizes (eval mode), deterministic in `config.seed`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    config = (config or TinyClipConfig()).validate()
    if vocab_size is None:
        vocab_size = len(clip_tokenizer(config.max_text_len))
    text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=config.text_width, intermediate_size=2 * config.text_width,
                          num_hidden_layers=config.text_layers, num_attention_heads=config.heads,
                          max_position_embeddings=config.max_text_len, projection_dim=config.projection_dim,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=config.vision_width, intermediate_size=2 * config.vision_width,
                              num_hidden_layers=config.vision_layers, num_attention_heads=config.heads,
                              image_size=config.image_size, patch_size=config.patch_size,
                              projection_dim=config.projection_dim)
    clip_config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             projection_dim=config.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CLIPModel(clip_config)
    return model.eval()


def image_processor(config: TinyClipConfig):
    """The `preprocessor_config.json` saved with the model: CLIP mean/std, resize + center crop to image_size."""
    try:  # transformers ≥ 5: the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    size = int(config.image_size)
    return Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                     image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def tiny_clip(device=None, *, path=None) -> ClipEncoder:
    """The shipped tiny CLIP as a `ClipEncoder`, built from the in-code tokenizer and the config/weights
    files (not through `from_pretrained`, so comparing with `ClipEncoder("tiny-clip")` checks the saved
    folder). `path`: another folder written by `train_tiny_clip`."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    root = Path(path) if path is not None else TINY_CLIP_PATH
    weights = root / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"tiny CLIP weights not found: {str(weights)!r} (run python -m rcgrpo.minibench.clip)")
    config = CLIPConfig.from_json_file(str(root / "config.json"))
    with torch.random.fork_rng(devices=[]):
        model = CLIPModel(config)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{str(weights)!r} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    proc = json.loads((root / "preprocessor_config.json").read_text())
    tok = clip_tokenizer(config.text_config.max_position_embeddings)
    return ClipEncoder(model.to(device) if device is not None else model, tokenizer=tok, device=device,
                       image_size=int(proc["crop_size"]["height"]), mean=proc["image_mean"], std=proc["image_std"])


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of L2-normalized image embeddings `[B, D]` against the distinct captions of the
    batch: `text_emb` `[C, D]` holds the embeddings of `labels.unique()` (sorted), `labels` `[B]` the
    caption id of each image. Image → text: cross-entropy over the C captions; text → image: each
    caption's target is spread uniformly over the images that carry it."""
    present, index = torch.unique(labels, sorted=True, return_inverse=True)
    if text_emb.shape[0] != present.numel():
        raise ValueError(f"contrastive_loss: {text_emb.shape[0]} text embeddings for {present.numel()} distinct labels")
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # [B, C]
    i2t = F.cross_entropy(logits, index)
    positives = (index[None, :] == torch.arange(present.numel(), device=labels.device)[:, None]).float()  # [C, B]
    targets = positives / positives.sum(dim=1, keepdim=True)
    t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (i2t + t2i)


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embedding" in name or name == "logit_scale" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_tiny_clip(model, tokenizer, config: TinyClipConfig, output_dir, info: dict | None = None) -> Path:
    """Write the `save_pretrained` folder (model, tokenizer, preprocessor config, training.json) atomically."""
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        image_processor(config).save_pretrained(tmp)
        record = {"config": config.to_dict(), **(info or {})}
        record["config"].pop("output_dir", None)
        atomic_write_text(Path(tmp) / TRAINING_FILE, json.dumps(record, indent=2) + "\n")
        for child in Path(tmp).iterdir():  # save_pretrained may leave mkstemp's 0600: as readable as open()
            child.chmod(0o644)
    return output_dir


def train_tiny_clip(config: TinyClipConfig | None = None, log: Callable[[str], None] | None = print) -> Path:
    """Train the tiny CLIP on MiniBench train-split crops and write it to `config.output_dir`; returns it.

    Deterministic in (seed, data_seed) at a fixed thread count (CPU).
    """
    config = (config or TinyClipConfig()).validate()
    log = log or (lambda _m: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        start = time.time()
        pixels, labels = build_training_set(config, log)
        data_s = time.time() - start
        log(f"data: {len(labels)} crops from {config.train_examples} train examples in {data_s:.0f} s")
        tokenizer = clip_tokenizer(config.max_text_len)
        model = build_tiny_clip(config, vocab_size=len(tokenizer))
        model.train()
        captions = all_captions()
        enc = tokenizer(captions, padding=True, return_tensors="pt")
        opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)

        def lr_at(step: int) -> float:
            if step < config.warmup_steps:
                return config.lr * (step + 1) / config.warmup_steps
            t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

        gen = torch.Generator().manual_seed(config.seed)
        history = []
        train_start = time.time()
        running = 0.0
        for step in range(config.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            idx = torch.randint(len(labels), (config.batch_size,), generator=gen)
            batch_labels = labels[idx]
            present = torch.unique(batch_labels, sorted=True)
            img = _features(model.get_image_features(pixel_values=pixels[idx].float()))
            txt = _features(model.get_text_features(input_ids=enc["input_ids"][present],
                                                    attention_mask=enc["attention_mask"][present]))
            img = F.normalize(img, dim=-1)
            txt = F.normalize(txt, dim=-1)
            loss = contrastive_loss(img, txt, batch_labels, model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(100.0))
            running += float(loss.detach())
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                n = (step % config.log_every) + 1
                history.append({"step": step + 1, "loss": running / n, "logit_scale": float(model.logit_scale.detach().exp())})
                log(f"step {step + 1}/{config.steps}: loss {running / n:.4f}, scale {float(model.logit_scale.detach().exp()):.1f}, "
                    f"{time.time() - train_start:.0f} s")
                running = 0.0
        model.eval()
        train_s = time.time() - train_start
        info = {"crops": int(len(labels)), "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
                "threads": config.threads, "history": history, "torch": torch.__version__}
        out = save_tiny_clip(model, tokenizer, config, config.output_dir, info)
        log(f"saved {out} (data {data_s:.0f} s, training {train_s:.0f} s)")
        return out
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Held-out scores
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m rcgrpo.minibench.clip [--field value ...]`: train and save (every TinyClipConfig field)."""
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(TinyClipConfig).parse_args_into_dataclasses(args=argv)
    out = train_tiny_clip(config)
    scores = heldout_scores(tiny_clip(path=out))
    print(json.dumps(scores, indent=2))
    return 0


__all__ = [
    "EVAL_CROP_SIZE",
    "TINY_CLIP_PATH",
    "TinyClipConfig",
    "all_captions",
    "build_tiny_clip",
    "build_training_set",
    "clip_tokenizer",
    "contrastive_loss",
    "eval_crop",
    "heldout_scores",
    "image_processor",
    "native_crop",
    "save_tiny_clip",
    "tiny_clip",
    "train_tiny_clip",
]


if __name__ == "__main__":
    raise SystemExit(main())
