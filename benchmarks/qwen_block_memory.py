"""Activation coefficients of Qwen-Image's double-stream blocks for the dry run's memory model.

    .venv/bin/python benchmarks/qwen_block_memory.py [--heads 8] [--batch 2] [--text 32] [--image 256] [--vae]

For each mode (fp32, bf16, bf16 under CPU autocast) and each kind of pass (no-grad forward; forward +
backward with grad; the same with gradient checkpointing), one fresh process per point builds a
`QwenImageTransformer2DModel` of L blocks (H heads × 128, LoRA rank 8 on the eight attention
projections, base frozen), runs the pass on `batch` samples of S = text + 2·image tokens (target and
source), and reads the peak resident set size above the RSS after the model and inputs were built (glibc
told to mmap allocations above 256 KiB, so freed tensors leave the RSS; `rcgrpo.dryrun.measure`). With
peak = fixed + batch·S·d·e·(per_block·L + constant): the points (L=1, batch), (L=3, batch) give the growth
per added block, and (L=1, 2·batch) the per-sample constant free of the fixed part (libraries, allocator
arenas). Prints one JSON line per measurement and a summary table.

These are CPU numbers: CUDA's autocast keeps other ops in fp32 than CPU autocast does, and CUDA's SDPA
kernels keep other scratch, so `rcgrpo.dryrun.memory` states which coefficients come from here and which
are carried over from the FLUX.1 ones.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODES = ("fp32", "bf16", "bf16-autocast")
KINDS = ("forward", "grad", "checkpointing")
VAE_KINDS = ("vae_encode", "vae_decode")


def _vae(args) -> dict:
    """Peak RSS of the Qwen-Image VAE encoding `batch` images (or decoding `batch` latents) of side `side` px."""
    import gc

    import torch
    from diffusers import AutoencoderKLQwenImage

    from rcgrpo.dryrun.measure import _HostMemory, trim_host_heap, tune_host_allocator

    tune_host_allocator()
    torch.manual_seed(0)
    dtype = torch.float32 if args.mode == "fp32" else torch.bfloat16
    vae = AutoencoderKLQwenImage().to(dtype).eval().requires_grad_(False)
    side, b = args.side, args.batch
    if args.kind == "vae_encode":
        x = torch.rand(b, 3, 1, side, side, dtype=dtype) * 2 - 1
    else:
        x = torch.randn(b, 16, 1, side // 8, side // 8, dtype=dtype)
    gc.collect()
    trim_host_heap()
    host = _HostMemory()
    base = host.current()
    host.reset()
    with torch.no_grad():
        if args.kind == "vae_encode":
            vae.encode(x).latent_dist.mode()
        else:
            vae.decode(x, return_dict=False)[0]
    e = 4 if args.mode == "fp32" else 2
    return {"mode": args.mode, "kind": args.kind, "side": side, "batch": b, "peak_bytes": host.peak() - base,
            "unit_bytes": b * side * side * 96 * e}


def _one(args) -> dict:
    import gc

    import torch
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    from rcgrpo.dryrun.measure import _HostMemory, trim_host_heap, tune_host_allocator

    tune_host_allocator()
    torch.manual_seed(0)
    dtype = torch.float32 if args.mode == "fp32" else torch.bfloat16
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=args.layers,
                                        attention_head_dim=128, num_attention_heads=args.heads,
                                        joint_attention_dim=64, axes_dims_rope=(16, 56, 56)).to(dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                 "add_v_proj", "to_add_out"]))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()
    if args.kind == "checkpointing":
        model.enable_gradient_checkpointing()
    side = int(round(args.image ** 0.5))
    b = args.batch
    hidden = torch.randn(b, 2 * args.image, 64, dtype=dtype)
    text = torch.randn(b, args.text, 64, dtype=dtype)
    timestep = torch.full((b,), 0.5, dtype=dtype)
    shapes = [[(1, side, side), (1, side, side)]] * b
    gc.collect()
    trim_host_heap()
    host = _HostMemory()
    base = host.current()
    host.reset()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mode == "bf16-autocast")
    if args.kind == "forward":
        with torch.no_grad(), autocast:
            out = model(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, img_shapes=shapes,
                        return_dict=False)[0]
    else:
        with autocast:
            out = model(hidden_states=hidden, encoder_hidden_states=text, timestep=timestep, img_shapes=shapes,
                        return_dict=False)[0]
        out.float().square().mean().backward()
    peak = host.peak() - base
    d = args.heads * 128
    e = 4 if args.mode == "fp32" else 2
    seq = args.text + 2 * args.image
    return {"mode": args.mode, "kind": args.kind, "layers": args.layers, "peak_bytes": peak,
            "unit_bytes": b * seq * d * e, "batch": b, "tokens": seq, "d": d, "e": e}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--text", type=int, default=32)
    parser.add_argument("--image", type=int, default=256, help="target tokens (a square number); source the same")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="grad", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--vae", action="store_true", help="measure the VAE instead (fp32; encode batch 1, decode "
                                                          "batch 2, at 128 and 256 px)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_vae(args) if args.kind in VAE_KINDS else _one(args)), flush=True)
        return 0
    if args.vae:
        return _vae_table(args)
    rows = []
    for mode in args.modes:
        for kind in args.kinds:
            one = _run(args, mode, kind, layers=1)
            three = _run(args, mode, kind, layers=3)
            double = _run(args, mode, kind, layers=1, batch=2 * args.batch)
            unit = one["unit_bytes"]
            per_block = (three["peak_bytes"] - one["peak_bytes"]) / 2 / unit
            # peak = fixed + units · (per_block · L + constant): the batch-doubled run removes the fixed part
            constant = (double["peak_bytes"] - one["peak_bytes"]) / (double["unit_bytes"] - unit) - per_block
            rows.append((mode, kind, per_block, constant))
    print(f"\n{'mode':<15}{'pass':<15}{'per block':>10}{'constant':>10}   (units of batch·S·d·e)")
    for mode, kind, per_block, constant in rows:
        print(f"{mode:<15}{kind:<15}{per_block:>10.2f}{constant:>10.2f}")
    return 0


def _run(args, mode: str, kind: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--one", "--mode", mode, "--kind", kind, "--heads", str(args.heads),
           "--text", str(args.text), "--image", str(args.image)]
    extra.setdefault("batch", args.batch)
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def _vae_table(args) -> int:
    rows = []
    for mode in ("fp32",):  # CPU bf16 convolutions are slow and keep fp32 copies a GPU does not
        for kind, batch in (("vae_encode", 1), ("vae_decode", 2)):
            small = _run(args, mode, kind, side=128, batch=batch)
            large = _run(args, mode, kind, side=256, batch=batch)
            coef = (large["peak_bytes"] - small["peak_bytes"]) / (large["unit_bytes"] - small["unit_bytes"])
            rows.append((mode, kind, coef, large["peak_bytes"] / large["unit_bytes"]))
    print(f"\n{'mode':<15}{'pass':<15}{'slope':>10}{'at 256':>10}   (units of batch·H·W·96·e)")
    for mode, kind, coef, ratio in rows:
        print(f"{mode:<15}{kind:<15}{coef:>10.2f}{ratio:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
