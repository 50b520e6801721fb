"""`rcgrpo dryrun`: one RC-GRPO iteration of a full-size model with random weights (time, memory)."""
from __future__ import annotations

import argparse
import dataclasses

from ..dryrun.archs import ARCHS
from ..dryrun.report import format_report, write_json
from ..dryrun.run import DryRunSettings, dry_run


def add_dryrun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("One RC-GRPO iteration (rollout, ACD, decode, reward, update) of a full-size model "
                          "with random weights: per-phase time and peak memory, and a memory model.")
    parser.add_argument("--arch", default="flux-kontext-dev", choices=sorted(ARCHS), help="model architecture")
    parser.add_argument("--resolution", type=int, default=1024, help="edit height and width in pixels (multiple of 16)")
    parser.add_argument("--group", type=int, default=12, help="G: candidates per group")
    parser.add_argument("--anchors", type=int, default=4, help="B: anchors (< G)")
    parser.add_argument("--steps", type=int, default=28, help="T: Euler ODE steps of the rollout")
    parser.add_argument("--train-steps", type=int, default=8, help="transitions trained (first n, high noise first)")
    parser.add_argument("--train-step-chunk", type=int, default=8, help="train transitions per backward pass")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--offload-states", action="store_true", help="keep rollout states on the CPU during the update")
    parser.add_argument("--depth-scale", type=float, default=1.0,
                        help="fraction of the double and single blocks kept (at least 1 each; width unchanged)")
    parser.add_argument("--no-acd", dest="acd", action="store_false", help="disable the ACD reward (w_acd = 0)")
    parser.add_argument("--attention", choices=["acd", "eager"], default="acd",
                        help="ACD mass from the fused op (acd) or from materialized attention weights (eager)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="model dtype")
    parser.add_argument("--lora-rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--text-len", type=int, default=None, help="T5 tokens of the random prompt embeddings (default 512)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true",
                        help="run even when the memory model's estimate exceeds the device memory")
    parser.add_argument("--json", dest="json_path", default=None, metavar="OUT.json", help="also write the report as JSON")


def settings_from_args(args) -> DryRunSettings:
    names = {f.name for f in dataclasses.fields(DryRunSettings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    s = DryRunSettings(**values)
    s.validate()
    return s


def run_dryrun(args) -> int:
    settings = settings_from_args(args)
    report = dry_run(settings, log=lambda msg: print(msg, flush=True))
    print(format_report(report), flush=True)
    if settings.json_path:
        path = write_json(report, settings.json_path)
        print(f"wrote {path}")
    if report["error"]:
        raise RuntimeError(f"dry run ran out of memory in phase {'/'.join(report['error']['phase'])}: "
                           f"{report['error']['message']} (see the memory model and suggestions above)")
    return 0
