"""`rcgrpo train` (also `accelerate launch -m rcgrpo.train`): build pipeline, data and rewards from a config, train.

    rcgrpo train --preset tiny --output-dir runs/tiny
    rcgrpo train --config cfg.yaml --learning-rate 5e-5 --output-dir runs/x
    accelerate launch -m rcgrpo.train --config cfg.yaml      (or torchrun --nproc_per_node N -m rcgrpo.train ...)
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..train.config import PRESETS, RCGRPOConfig, parse_override


def add_train_arguments(parser) -> None:
    parser.add_argument("--preset", help=f"start from a preset: {', '.join(sorted(PRESETS))}")
    parser.add_argument("--config", help="YAML file with RCGRPOConfig fields")
    parser.add_argument("--resume", help="continue from the newest complete checkpoint in this run directory")
    parser.add_argument("--report", action="store_true", help="evaluate before/after and write a report (demo)")
    for f in dataclasses.fields(RCGRPOConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f"cfg_{f.name}", default=None,
                            metavar=f.type if isinstance(f.type, str) else f.type.__name__,
                            help=f.metadata.get("doc", ""))


def config_from_args(args) -> RCGRPOConfig:
    values: dict = {}
    if args.preset:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[args.preset])
    if args.config:
        values.update(RCGRPOConfig.from_yaml(args.config).to_dict() if not values else _yaml_values(args.config))
    if args.resume and not args.config and not args.preset:
        state = Path(args.resume)
        from ..train.checkpoints import list_checkpoints

        ckpts = list_checkpoints(state)
        if not ckpts:
            raise ValueError(f"--resume {args.resume!r}: no complete checkpoint found there")
        values.update(json.loads((ckpts[-1] / "trainer_state.json").read_text())["config"])
    for f in dataclasses.fields(RCGRPOConfig):
        raw = getattr(args, f"cfg_{f.name}", None)
        if raw is not None:
            values[f.name] = parse_override(f.name, raw)
    if args.resume and args.cfg_output_dir is None:
        values["output_dir"] = args.resume
    return RCGRPOConfig.from_dict(values, source="configuration")


def _yaml_values(path) -> dict:
    import yaml

    values = yaml.safe_load(Path(path).read_text()) or {}
    RCGRPOConfig.from_dict({**RCGRPOConfig().to_dict(), **values}, source=f"config file {path!r}")
    return values


def run_train(args) -> int:
    import torch

    from ..flux.pipeline import load_pipeline
    from ..rewards.registry import reward_funcs_from_config
    from ..train.data import build_datasets
    from ..train.trainer import RCGRPOTrainer

    config = config_from_args(args)
    device = None if config.device == "auto" else config.device
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" and torch.cuda.is_available() else None
    pipe, _ = load_pipeline(config.model, device=device, dtype=dtype)
    train_set, eval_set = build_datasets(config)
    trainer = RCGRPOTrainer(pipe, config, reward_funcs_from_config(config), train_set, eval_set)
    if args.resume:
        trainer.resume(args.resume)
    main = trainer.accelerator.is_main_process
    before = trainer.evaluate() if args.report else None
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    if trainer.stopped_by_signal is not None:
        if main:
            print(f"stopped by signal {trainer.stopped_by_signal} after step {trainer.step}; "
                  f"resume with: rcgrpo train --resume {trainer.output_dir}")
        return 0
    if main:
        print(f"trained {trainer.step} steps in {elapsed:.1f} s; LoRA at {trainer.output_dir / 'lora'}")
    if args.report:
        after = trainer.evaluate()
        if main:
            from ..train.report import write_training_report

            write_training_report(trainer, before=before, after=after, seconds=elapsed)
            print(f"held-out reward: before {before:.4f} after {after:.4f}")
    return 0


