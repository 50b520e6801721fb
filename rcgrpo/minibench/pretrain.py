"""Pretrain the tiny MiniBench editor: an autoencoder first, then the Kontext transformer by flow matching.

    from rcgrpo.minibench.pretrain import PretrainConfig, run_pretrain
    path = run_pretrain(PretrainConfig(output_dir="tiny-editor"))   # `rcgrpo pretrain-tiny`

Stage 1 (VAE): `AutoencoderKL` on generated MiniBench images (sources and ground truths of the train
split, drawn per step), loss `MSE + vae_kl_weight · KL`; then `shift_factor` / `scaling_factor` are set
so that encoded latents have zero mean and unit variance (FLUX's convention `z = (μ − shift) · scale`).

Stage 2 (flow matching): pairs (source, instruction) → ground truth of `train_examples` train examples,
encoded once (the posterior mode, as FluxKontextPipeline encodes its context image). The transformer is
fed exactly as `FluxKontextPipeline` feeds it: target tokens then context tokens (2×2-packed latents),
`img_ids` of the context with first coordinate 1, T5 prompt embeddings padded to `max_sequence_length`
(drawn per step from `text_lengths`, so any of them works), CLIP pooled embeddings, the guidance
embedding, and `timestep = σ` (the pipeline's `t / 1000`). With x0 the target latent and ε ~ N(0, I):

    x_σ = (1 − σ)·x0 + σ·ε,   target velocity v = ε − x0,   loss = mean_w ‖v_θ(x_σ, σ, c) − v‖²

σ is drawn uniformly and mapped through the scheduler's resolution shift (the same `mu` the pipeline uses
for 64 tokens); tokens inside the edit mask weigh `1 + mask_loss_weight`. The T5 and CLIP text encoders
train with the transformer. The exported weights are an EMA of the trained ones.

Every random draw is a function of (seed, stage, step), the learning rate is constant after warm-up and
the EMA does not depend on the total step count, so a run of N steps gives the same weights as the first
N steps of a longer one and a resumed run the same as an uninterrupted one (same thread count).
Checkpoints (`work_dir/checkpoint-{vae,flow}.safetensors`, written to a temp file and renamed) make a
kill lose at most `checkpoint_every` steps; `eval_every` steps it evaluates on held-out MiniBench examples
with the stock pipeline (background PSNR and `minibench_reward`), logs to `work_dir/metrics.jsonl`, and
keeps that snapshot under `work_dir/snapshots/step-N/`. The final pipeline is written to `output_dir`
atomically (a temp directory renamed into place): `save_pretrained` format, transformer and VAE stored in
float16 (text encoders float32, so a stock `from_pretrained(path)` gives float32 modules throughout).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .editor import EDITOR_TEXT_LEN, EditorConfig, build_editor
from .tasks import MiniBenchDataset, example_seed, generate_example

log = logging.getLogger("rcgrpo.minibench.pretrain")

_STAGE_CODES = {"vae": 1, "flow": 2, "eval": 3}


@dataclass
class PretrainConfig:
    """Configuration of `run_pretrain` (every field is also a `rcgrpo pretrain-tiny --field` flag)."""

    output_dir: str = field(default="tiny-editor", metadata={"help": "where the final pipeline is written (save_pretrained format; replaced atomically)"})
    work_dir: str | None = field(default=None, metadata={"help": "checkpoints, snapshots, logs (default: <output_dir>.work)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, data and noise (the run is a function of it)"})
    num_threads: int = field(default=1, metadata={"help": "torch CPU threads (1 is polite on a shared machine)"})
    resume: bool = field(default=True, metadata={"help": "continue from the checkpoints in work_dir when their config matches"})
    resolution: int = field(default=64, metadata={"help": "image side in pixels (multiple of 8 with the 3-level VAE)"})
    train_examples: int = field(default=20000, metadata={"help": "train-split examples (pairs) the transformer trains on"})
    vae_steps: int = field(default=2500, metadata={"help": "autoencoder optimisation steps (0 skips stage 1 only when a VAE checkpoint exists)"})
    vae_batch_size: int = field(default=16, metadata={"help": "images per VAE step (half sources, half ground truths)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE AdamW learning rate"})
    vae_kl_weight: float = field(default=1e-4, metadata={"help": "weight of the mean per-element KL term of the VAE loss"})
    flow_steps: int = field(default=3000, metadata={"help": "flow-matching optimisation steps of the transformer and text encoders"})
    flow_batch_size: int = field(default=32, metadata={"help": "pairs per flow-matching step"})
    flow_lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the transformer and text encoders (constant after warm-up)"})
    warmup_steps: int = field(default=200, metadata={"help": "linear learning-rate warm-up steps (both stages)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 disables)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the exported transformer/text-encoder weights (0: no EMA)"})
    mask_loss_weight: float = field(default=2.0, metadata={"help": "extra flow-matching loss weight of tokens inside the edit mask"})
    text_lengths: list[int] = field(default_factory=lambda: [16, 24, 32, 48, 64], metadata={"help": "T5 max_sequence_length values drawn per step"})
    guidance_min: float = field(default=1.0, metadata={"help": "smallest guidance-embedding value drawn in training"})
    guidance_max: float = field(default=4.0, metadata={"help": "largest guidance-embedding value drawn in training"})
    eval_every: int = field(default=500, metadata={"help": "held-out evaluation (and snapshot) every this many flow steps (0: only at the end)"})
    eval_per_task: int = field(default=12, metadata={"help": "held-out examples per task in each evaluation"})
    eval_steps: int = field(default=8, metadata={"help": "Euler steps of the evaluation rollouts"})
    eval_guidance: float = field(default=2.5, metadata={"help": "guidance scale of the evaluation rollouts"})
    eval_text_len: int = field(default=EDITOR_TEXT_LEN, metadata={"help": "max_sequence_length of the evaluation rollouts"})
    checkpoint_every: int = field(default=250, metadata={"help": "checkpoint every this many steps (both stages)"})
    log_every: int = field(default=50, metadata={"help": "log the loss every this many steps"})
    save_dtype: str = field(default="float16", metadata={"help": "storage dtype of the transformer and VAE weights: float16 or float32"})
    vae_channels: list[int] = field(default_factory=lambda: [16, 32, 64], metadata={"help": "VAE block widths (len = levels)"})
    latent_channels: int = field(default=8, metadata={"help": "VAE latent channels"})
    num_layers: int = field(default=2, metadata={"help": "double-stream transformer blocks"})
    num_single_layers: int = field(default=4, metadata={"help": "single-stream transformer blocks"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    head_dim: int = field(default=16, metadata={"help": "attention head dimension"})
    rope_axes: list[int] = field(default_factory=lambda: [4, 6, 6], metadata={"help": "RoPE dims per axis, summing to head_dim"})

    def editor_config(self) -> EditorConfig:
        return EditorConfig(resolution=self.resolution, vae_channels=tuple(self.vae_channels),
                            latent_channels=self.latent_channels, num_layers=self.num_layers,
                            num_single_layers=self.num_single_layers, num_heads=self.num_heads,
                            head_dim=self.head_dim, rope_axes=tuple(self.rope_axes))

    def validate(self) -> "PretrainConfig":
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"PretrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("train_examples", "vae_batch_size", "flow_batch_size", "num_threads", "eval_steps",
                     "checkpoint_every", "log_every", "eval_text_len"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an int ≥ 1")
        for name in ("vae_steps", "flow_steps", "warmup_steps", "eval_every", "eval_per_task", "seed"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an int ≥ 0")
        for name in ("vae_lr", "flow_lr"):
            need(isinstance(getattr(self, name), (int, float)) and 0 < getattr(self, name) < 1, name, "in (0, 1)")
        for name in ("vae_kl_weight", "weight_decay", "grad_clip", "mask_loss_weight"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0
                 and math.isfinite(getattr(self, name)), name, "a finite number ≥ 0")
        need(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)")
        need(self.vae_batch_size >= 2 and self.vae_batch_size % 2 == 0, "vae_batch_size", "an even int ≥ 2")
        need(0 < self.guidance_min <= self.guidance_max, "guidance_min", "positive and ≤ guidance_max")
        need(bool(self.text_lengths) and all(isinstance(n, int) and 1 <= n <= 512 for n in self.text_lengths),
             "text_lengths", "a non-empty list of ints in [1, 512]")
        need(self.save_dtype in ("float16", "float32"), "save_dtype", "'float16' or 'float32'")
        need(not Path(self.output_dir).exists() or Path(self.output_dir).is_dir(), "output_dir", "a directory path")
        self.editor_config().validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------


def _rng(seed: int, stage: str, step: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STAGE_CODES[stage], int(step)]))


def _torch_gen(seed: int, stage: str, step: int) -> torch.Generator:
    s = int(np.random.SeedSequence([int(seed), _STAGE_CODES[stage], int(step), 7]).generate_state(1)[0])
    return torch.Generator().manual_seed(s)


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _vae_decay(step: int, total: int) -> float:
    """VAE learning-rate decay: constant for the first half, then a cosine down to 5 %."""
    half = total // 2
    if step < half or total - half <= 0:
        return 1.0
    frac = (step - half) / max(1, total - half)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))


def _atomic_save_file(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_file(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    tensors, meta = {}, {}
    with safe_open(str(path), framework="pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    return tensors, meta


def _state_with_optimizer(modules: dict, optimizer: torch.optim.Optimizer, ema: dict | None) -> dict:
    """Flatten modules, AdamW moments and EMA into one tensor dict (safetensors has no pickles)."""
    out = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            out[f"model/{name}/{k}"] = v
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                val = st[key]
                out[f"optim/{i}/{key}"] = val if isinstance(val, torch.Tensor) else torch.tensor(float(val))
    if ema:
        for k, v in ema.items():
            out[f"ema/{k}"] = v
    return out


def _restore(tensors: dict, modules: dict, optimizer: torch.optim.Optimizer, ema: dict | None) -> None:
    for name, module in modules.items():
        prefix = f"model/{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        st = {}
        for key in ("exp_avg", "exp_avg_sq", "step"):
            t = tensors.get(f"optim/{i}/{key}")
            if t is not None:
                st[key] = t.clone()
        if st:
            optimizer.state[p] = st
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema/{k}"])


def _fingerprint(config: PretrainConfig, stage: str) -> dict:
    """The config fields a stage's checkpoint depends on (resume refuses a mismatch)."""
    keys = ["seed", "resolution", "train_examples", "vae_batch_size", "vae_lr", "vae_kl_weight", "vae_channels",
             "latent_channels", "warmup_steps", "weight_decay", "grad_clip"]
    if stage == "flow":
        keys += ["vae_steps", "flow_batch_size", "flow_lr", "ema_decay", "mask_loss_weight",
                 "text_lengths", "guidance_min", "guidance_max", "num_layers", "num_single_layers", "num_heads",
                 "head_dim", "rope_axes"]
    d = config.to_dict()
    return {k: d[k] for k in keys}


def _token_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, H, W] pixel mask → [B, N] max-pooled token mask (token = factor×factor pixels)."""
    return torch.nn.functional.max_pool2d(mask[:, None].float(), factor).flatten(1)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] → [B, (h/2)(w/2), 4C], FluxKontextPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _image_ids(h2: int, w2: int, first: float) -> torch.Tensor:
    ids = torch.zeros(h2, w2, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


def _mu(pipe, seq_len: int) -> float:
    cfg = pipe.scheduler.config
    base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
    base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


def _encode_prompts(pipe, prompts: list[str], text_len: int):
    """(T5 embeddings [B, L, C], CLIP pooled [B, C']) as FluxKontextPipeline computes them, with grad."""
    t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=text_len, truncation=True,
                              return_tensors="pt").input_ids
    clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    embeds = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    return embeds, pooled


def _image_pairs(examples) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.stack([e.image for e in examples])
    tgt = torch.stack([e.target for e in examples])
    return src, tgt


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_editor(pipe, examples, *, num_steps: int = 8, guidance_scale: float = 2.5,
                    max_sequence_length: int = EDITOR_TEXT_LEN, seed: int = 0, batch_size: int = 36) -> dict:
    """Edit `examples` (MiniBench) with the stock pipeline; per-example background PSNR and MiniBench reward.

    Returns {"edited": [N,3,H,W], "background_psnr": [N], "reward": [N], "task": [...]} plus summary
    means ("psnr_mean", "reward_mean", "reward_std", "reward_<task>").
    """
    from rcgrpo.rewards import background_psnr

    from .reward import minibench_reward

    size = examples[0].image.shape[-1]
    outs = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        gen = torch.Generator().manual_seed(int(seed) + start)
        out = pipe(image=torch.stack([e.image for e in chunk]), prompt=[e.instruction for e in chunk],
                   height=size, width=size, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                   generator=gen, output_type="pt", max_area=size * size, _auto_resize=False,
                   max_sequence_length=max_sequence_length).images
        outs.append(torch.as_tensor(out).float().clamp(0, 1).cpu())
    edited = torch.cat(outs)
    sources = torch.stack([e.image for e in examples])
    masks = torch.stack([e.mask for e in examples])[:, None]
    instr = [e.instruction for e in examples]
    meta = [e.metadata for e in examples]
    psnr = background_psnr(edited, sources, masks, instr, meta)
    reward = minibench_reward(edited, sources, masks, instr, meta)
    tasks = [e.task for e in examples]
    res = {"edited": edited, "background_psnr": psnr, "reward": reward, "task": tasks,
           "psnr_mean": float(psnr.mean()), "reward_mean": float(reward.mean()),
           "reward_std": float(reward.std()) if len(reward) > 1 else 0.0}
    for t in sorted(set(tasks)):
        sel = torch.tensor([x == t for x in tasks])
        res[f"reward_{t}"] = float(reward[sel].mean())
        res[f"psnr_{t}"] = float(psnr[sel].mean())
    return res


def heldout_examples(per_task: int, *, seed: int = 0, size: int = 64) -> list:
    """The held-out examples used to evaluate pretraining (per_task of each task of the val split)."""
    return list(MiniBenchDataset(split="val", per_task=per_task, seed=seed, size=size))


# ----------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------


def _vae_stage(config: PretrainConfig, pipe, work: Path) -> None:
    vae = pipe.vae
    ckpt = work / "checkpoint-vae.safetensors"
    vae.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=config.weight_decay)
    start = 0
    fp = _fingerprint(config, "vae")
    if config.resume and ckpt.is_file():
        tensors, meta = _load_file(ckpt)
        if meta.get("fingerprint") == fp:
            _restore(tensors, {"vae": vae}, opt, None)
            start = int(meta["step"])
            log.info("vae: resumed at step %d from %s", start, ckpt)
        else:
            log.warning("vae: checkpoint %s is from another configuration; starting over", ckpt)
    n_img = config.vae_batch_size // 2
    t0, running = time.time(), []
    for step in range(start, config.vae_steps):
        rng = _rng(config.seed, "vae", step)
        idx = rng.integers(0, config.train_examples, n_img)
        exs = [generate_example(example_seed(config.seed, "train", int(i)), size=config.resolution) for i in idx]
        src, tgt = _image_pairs(exs)
        x = torch.cat([src, tgt]) * 2 - 1
        for g in opt.param_groups:
            g["lr"] = config.vae_lr * _lr_factor(step, config.warmup_steps) * _vae_decay(step, config.vae_steps)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=_torch_gen(config.seed, "vae", step))
        recon = vae.decode(z).sample
        mse = (recon - x).square().mean() / 4  # in [0, 1] pixel units
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1 - posterior.logvar).mean()
        loss = mse + config.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        opt.step()
        running.append((float(mse.detach()), float(kl.detach())))
        done = step + 1
        if done % config.log_every == 0 or done == config.vae_steps:
            m = np.mean(running, 0)
            psnr = -10 * math.log10(max(m[0], 1e-12))
            log.info("vae step %d/%d  mse %.5f (psnr %.2f dB)  kl %.3f  %.2f s/step", done, config.vae_steps, m[0],
                     psnr, m[1], (time.time() - t0) / len(running))
            _append_metrics(work, {"stage": "vae", "step": done, "mse": float(m[0]), "psnr": psnr, "kl": float(m[1])})
            running, t0 = [], time.time()
        if done % config.checkpoint_every == 0 or done == config.vae_steps:
            _atomic_save_file(_state_with_optimizer({"vae": vae}, opt, None), ckpt,
                              {"step": done, "fingerprint": fp, "stage": "vae"})
    if config.vae_steps == 0 and ckpt.is_file():
        tensors, meta = _load_file(ckpt)
        _restore(tensors, {"vae": vae}, opt, None)
    vae.eval()
    vae.requires_grad_(False)
    # latent normalization: z = (mu - shift) * scale has zero mean, unit variance on train images
    with torch.no_grad():
        exs = [generate_example(example_seed(config.seed, "train", i), size=config.resolution) for i in range(256)]
        src, tgt = _image_pairs(exs)
        mu = vae.encode(torch.cat([src, tgt]) * 2 - 1).latent_dist.mean
    shift, scale = float(mu.mean()), float(1.0 / mu.std())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(scale, 6))
    log.info("vae: latent shift %.4f scale %.4f", shift, scale)


def _encode_pool(config: PretrainConfig, pipe) -> dict:
    """Latents (normalized, packed) of the training pairs, token masks, instructions."""
    vae = pipe.vae
    factor = pipe.vae_scale_factor * 2
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    ds = MiniBenchDataset(config.train_examples, split="train", seed=config.seed, size=config.resolution, cache=False)
    src_l, tgt_l, masks, prompts = [], [], [], []
    t0 = time.time()
    chunk = 256
    with torch.no_grad():
        for start in range(0, len(ds), chunk):
            exs = [ds[i] for i in range(start, min(len(ds), start + chunk))]
            src, tgt = _image_pairs(exs)
            z = vae.encode(torch.cat([src, tgt]) * 2 - 1).latent_dist.mode()
            z = _pack((z - shift) * scale)
            src_l.append(z[: len(exs)].half())
            tgt_l.append(z[len(exs):].half())
            masks.append(_token_mask(torch.stack([e.mask for e in exs]), factor).bool())
            prompts += [e.instruction for e in exs]
    log.info("flow: encoded %d training pairs in %.0f s", len(prompts), time.time() - t0)
    return {"source": torch.cat(src_l), "target": torch.cat(tgt_l), "mask": torch.cat(masks), "prompt": prompts}


def _trainable(pipe) -> dict:
    return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}


def _flow_stage(config: PretrainConfig, pipe, work: Path) -> None:
    modules = _trainable(pipe)
    for m in modules.values():
        m.requires_grad_(True)
        m.train()
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=config.flow_lr, weight_decay=config.weight_decay)
    ema = None
    if config.ema_decay > 0:
        ema = {f"{n}/{k}": v.detach().clone() for n, m in modules.items() for k, v in m.state_dict().items()
               if v.is_floating_point()}
    ckpt = work / "checkpoint-flow.safetensors"
    fp = _fingerprint(config, "flow")
    start = 0
    if config.resume and ckpt.is_file():
        tensors, meta = _load_file(ckpt)
        if meta.get("fingerprint") == fp and int(meta["step"]) <= config.flow_steps:
            _restore(tensors, modules, opt, ema)
            start = int(meta["step"])
            log.info("flow: resumed at step %d from %s", start, ckpt)
        else:
            log.warning("flow: checkpoint %s is from another configuration (or a longer run); starting over", ckpt)
    pool = _encode_pool(config, pipe)
    n, tokens, channels = pool["target"].shape
    h2 = w2 = int(round(math.sqrt(tokens)))
    img_ids = torch.cat([_image_ids(h2, w2, 0.0), _image_ids(h2, w2, 1.0)])
    mu = _mu(pipe, tokens)
    heldout = heldout_examples(config.eval_per_task, seed=config.seed, size=config.resolution) \
        if config.eval_per_task > 0 else []
    t0, running = time.time(), []
    step = start
    if start == config.flow_steps and start > 0:
        _evaluate_and_snapshot(config, pipe, modules, ema, heldout, work, step)
    for step in range(start, config.flow_steps):
        rng = _rng(config.seed, "flow", step)
        gen = _torch_gen(config.seed, "flow", step)
        idx = torch.from_numpy(rng.integers(0, n, config.flow_batch_size))
        text_len = int(config.text_lengths[int(rng.integers(len(config.text_lengths)))])
        guidance = torch.from_numpy(rng.uniform(config.guidance_min, config.guidance_max, config.flow_batch_size)).float()
        u = torch.from_numpy(rng.uniform(0.0, 1.0, config.flow_batch_size)).float().clamp(1e-4, 1 - 1e-4)
        sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the scheduler's exponential time shift
        x0 = pool["target"][idx].float()
        ctx = pool["source"][idx].float()
        noise = torch.randn(x0.shape, generator=gen)
        x_t = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        target_v = noise - x0
        prompts = [pool["prompt"][int(i)] for i in idx]
        for g in opt.param_groups:
            g["lr"] = config.flow_lr * _lr_factor(step, config.warmup_steps)
        embeds, pooled = _encode_prompts(pipe, prompts, text_len)
        pred = pipe.transformer(
            hidden_states=torch.cat([x_t, ctx], dim=1),
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=torch.zeros(text_len, 3),
            img_ids=img_ids,
            return_dict=False,
        )[0][:, :tokens]
        weights = 1.0 + config.mask_loss_weight * pool["mask"][idx].float()  # [B, N]
        per_token = (pred - target_v).square().mean(-1)
        loss = (per_token * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))  # EMA warm-up (independent of flow_steps)
            with torch.no_grad():
                for name, m in modules.items():
                    for k, v in m.state_dict().items():
                        key = f"{name}/{k}"
                        if key in ema:
                            ema[key].lerp_(v, 1 - decay)
        running.append(float(loss.detach()))
        done = step + 1
        if done % config.log_every == 0 or done == config.flow_steps:
            m = float(np.mean(running))
            log.info("flow step %d/%d  loss %.4f  %.2f s/step", done, config.flow_steps, m, (time.time() - t0) / len(running))
            _append_metrics(work, {"stage": "flow", "step": done, "loss": m})
            running, t0 = [], time.time()
        if done % config.checkpoint_every == 0 or done == config.flow_steps:
            _atomic_save_file(_state_with_optimizer(modules, opt, ema), ckpt,
                              {"step": done, "fingerprint": fp, "stage": "flow"})
        if (config.eval_every and done % config.eval_every == 0) or done == config.flow_steps:
            _evaluate_and_snapshot(config, pipe, modules, ema, heldout, work, done)
            for m in modules.values():
                m.train()
    _swap_in_ema(modules, ema)
    for m in modules.values():
        m.eval()
        m.requires_grad_(False)


def _swap_in_ema(modules: dict, ema: dict | None) -> dict | None:
    """Load the EMA weights into the modules; returns the previous weights (to swap back)."""
    if ema is None:
        return None
    backup = {}
    for name, m in modules.items():
        sd = m.state_dict()
        new = {}
        for k, v in sd.items():
            key = f"{name}/{k}"
            if key in ema:
                backup[key] = v.detach().clone()
                new[k] = ema[key]
            else:
                new[k] = v
        m.load_state_dict(new)
    return backup


def _swap_back(modules: dict, backup: dict | None) -> None:
    if backup is None:
        return
    for name, m in modules.items():
        sd = m.state_dict()
        m.load_state_dict({k: backup.get(f"{name}/{k}", v) for k, v in sd.items()})


def _evaluate_and_snapshot(config, pipe, modules, ema, heldout, work: Path, step: int) -> None:
    backup = _swap_in_ema(modules, ema)
    for m in modules.values():
        m.eval()
    try:
        snap = work / "snapshots" / f"step-{step}"
        save_editor(pipe, snap, save_dtype=config.save_dtype,
                    extra={"pretrain_config.json": {**config.to_dict(), "flow_steps": step}})
        if heldout:
            from .editor import load_editor

            t0 = time.time()
            res = evaluate_editor(load_editor(snap), heldout, num_steps=config.eval_steps,
                                  guidance_scale=config.eval_guidance, max_sequence_length=config.eval_text_len,
                                  seed=config.seed)
            summary = {k: v for k, v in res.items() if isinstance(v, float)}
            log.info("eval step %d: background PSNR %.2f dB, reward %.3f ± %.3f (%s)  [%.1f s]", step,
                     summary["psnr_mean"], summary["reward_mean"], summary["reward_std"],
                     ", ".join(f"{k[7:]} {v:.3f}" for k, v in summary.items() if k.startswith("reward_") and
                               k[7:] in ("add", "remove", "replace")), time.time() - t0)
            _append_metrics(work, {"stage": "eval", "step": step, **summary})
            (snap / "eval.json").write_text(json.dumps({"step": step, **summary}, indent=1))
    finally:
        _swap_back(modules, backup)


def _append_metrics(work: Path, record: dict) -> None:
    with open(work / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({**record, "time": round(time.time(), 1)}) + "\n")


def save_editor(pipe, path, *, save_dtype: str = "float16", extra: dict | None = None) -> Path:
    """Write the pipeline to `path` atomically: a sibling temp directory, then renamed into place.

    The transformer and VAE are stored in `save_dtype`, the text encoders in float32 (transformers 5 would
    otherwise load them in the stored dtype); `extra` maps file names to JSON-serializable objects.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o755)
    dtype = {"float16": torch.float16, "float32": torch.float32}[save_dtype]
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if dtype != torch.float32:
            from safetensors.torch import load_file, save_file

            for name in ("transformer", "vae"):
                for file in sorted((tmp / name).glob("*.safetensors")):
                    tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(file)).items()}
                    save_file(tensors, str(file), metadata={"format": "pt"})
        for fname, obj in (extra or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o644)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{int(time.time() * 1000)}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def run_pretrain(config: PretrainConfig) -> Path:
    """Run both stages (resuming from `work_dir` when possible) and write the pipeline to `output_dir`."""
    config.validate()
    out = Path(config.output_dir)
    work = Path(config.work_dir) if config.work_dir else out.parent / (out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(work / "pretrain.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    if not log.level:
        log.setLevel(logging.INFO)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    t_start = time.time()
    try:
        log.info("pretrain: %s", json.dumps(config.to_dict(), sort_keys=True))
        (work / "pretrain_config.json").write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
        pipe = build_editor(config.editor_config(), seed=config.seed)
        _vae_stage(config, pipe, work)
        _flow_stage(config, pipe, work)
        elapsed = time.time() - t_start
        info = {**config.to_dict(), "elapsed_s_last_run": round(elapsed, 1)}
        save_editor(pipe, out, save_dtype=config.save_dtype, extra={"pretrain_config.json": info})
        log.info("pretrain: wrote %s in %.0f s", out, elapsed)
        return out
    finally:
        torch.set_num_threads(previous_threads)
        log.removeHandler(handler)
        handler.close()


def main(argv=None) -> Path:
    """`python -m rcgrpo.minibench.pretrain --output-dir DIR ...` (HfArgumentParser flags)."""
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    (config,) = HfArgumentParser(PretrainConfig).parse_args_into_dataclasses(args=argv)
    return run_pretrain(config)


if __name__ == "__main__":
    main()
