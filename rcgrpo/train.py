"""`rcgrpo train` / `accelerate launch -m rcgrpo.train`: build pipeline, data and rewards from a config, train.

    rcgrpo train --preset tiny --output-dir runs/tiny
    rcgrpo train --config cfg.yaml --learning-rate 5e-5 --output-dir runs/x
    accelerate launch -m rcgrpo.train --config cfg.yaml      (or torchrun --nproc_per_node N -m rcgrpo.train ...)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, RCGRPOConfig, parse_override, preset


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
        from .trainer import list_checkpoints

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


def resolve_reward_funcs(config: RCGRPOConfig) -> list:
    """[(name, callable)] for config.reward_funcs: built-in names (see `rcgrpo.rewards.resolve_reward`),
    "redness" (the demo task) or 'module:function'."""
    from .rewards import resolve_reward
    from .synthetic import redness_reward

    funcs = []
    for name in map(str, config.reward_funcs):
        if name == "redness":
            funcs.append((name, redness_reward))
        elif name == "editscore":
            if not config.editscore_url:
                raise ValueError("reward 'editscore' needs --editscore-url http://host:port of a running reward server")
            funcs.append((name, resolve_reward(name, url=config.editscore_url)))
        elif name in ("clip_lct", "clip_lci"):
            funcs.append((name, resolve_reward(name, model=config.clip_model)))
        else:
            funcs.append((name, resolve_reward(name)))
    return funcs


def build_datasets(config: RCGRPOConfig):
    if config.dataset == "squares":
        from .synthetic import SquareDataset

        train = SquareDataset(config.train_size, size=config.resolution, seed=config.seed)
        held_out = SquareDataset(config.eval_size, size=config.resolution, seed=10_000 + config.seed)
        return train, held_out
    from .compbench import CompBenchDataset

    data = CompBenchDataset(config.dataset, resolution=config.resolution, require_ground_truth=False)
    n_eval = min(config.eval_size, max(len(data) - 1, 0))
    return _Subset(data, range(n_eval, len(data))), _Subset(data, range(n_eval))


class _Subset:
    def __init__(self, data, indices):
        self.data, self.indices = data, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.data[self.indices[i]]


def run_train(args) -> int:
    import torch

    from .pipeline import load_pipeline
    from .trainer import RCGRPOTrainer

    config = config_from_args(args)
    device = None if config.device == "auto" else config.device
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" and torch.cuda.is_available() else None
    pipe, _ = load_pipeline(config.model, device=device, dtype=dtype)
    train_set, eval_set = build_datasets(config)
    trainer = RCGRPOTrainer(pipe, config, resolve_reward_funcs(config), train_set, eval_set)
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
            from .report import write_training_report

            write_training_report(trainer, before=before, after=after, seconds=elapsed)
            print(f"held-out reward: before {before:.4f} after {after:.4f}")
    return 0


def main(argv=None) -> int:
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
