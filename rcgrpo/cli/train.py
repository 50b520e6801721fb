"""`rcgrpo train` (also `accelerate launch -m rcgrpo.train` / `torchrun -m rcgrpo.train`): a config from a
preset, a YAML file and flags (in that order of precedence, flags last), then the pipeline, data and
rewards it names, then training.

    rcgrpo train --preset tiny --output-dir runs/tiny
    rcgrpo train --config cfg.yaml --learning-rate 5e-5 --output-dir runs/x
    rcgrpo train --resume runs/x --max-steps 400           (a run directory or a checkpoint-N directory)

Every `RCGRPOConfig` field is a flag (`rcgrpo train --help` lists them with their defaults).
"""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from ..train.config import PRESETS, RCGRPOConfig
from .parsing import build_parser, parse
from .validation import check_output_dir


@dataclass
class TrainCommandArguments:
    """Options of `rcgrpo train` besides the config fields."""

    preset: Optional[str] = field(default=None, metadata={"help": f"start from a preset: {', '.join(sorted(PRESETS))}"})
    config: Optional[str] = field(default=None, metadata={"help": "YAML file of RCGRPOConfig fields (over the preset)"})
    resume: Optional[str] = field(default=None, metadata={
        "help": "continue a run: its directory (newest complete checkpoint) or a checkpoint-N directory; without "
                "--preset/--config the checkpoint's config is used, and flags change what a resume may change"})
    report: bool = field(default=False, metadata={"help": "evaluate before/after and write a report (the demo)"})


def base_values(command: TrainCommandArguments) -> dict:
    """The config values under the flags: preset, then YAML, or the resumed checkpoint's config."""
    return _base_values(command)[0]


def _base_values(command: TrainCommandArguments) -> tuple[dict, dict]:
    """(values, origins): the config values under the flags and, per field, where its value came from
    ("preset 'tiny'", "config file 'x.yaml', line 3: max_steps", "checkpoint 'runs/a/checkpoint-2'")."""
    values: dict = {}
    origins: dict = {}
    if command.preset:
        if command.preset not in PRESETS:
            raise ValueError(f"--preset {command.preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
        values.update(PRESETS[command.preset])
        origins.update({k: f"preset {command.preset!r}: {k}" for k in PRESETS[command.preset]})
    if command.config:
        from ..train.config import yaml_key_lines

        read = RCGRPOConfig.read_yaml(command.config)
        lines = yaml_key_lines(command.config)
        values.update(read)
        origins.update({k: f"config file {command.config!r}, line {lines.get(k, '?')}: {k}" for k in read})
    if command.resume and not command.config and not command.preset:
        from ..train.checkpoints import find_checkpoint, read_trainer_state

        checkpoint = find_checkpoint(command.resume)
        saved = read_trainer_state(checkpoint).get("config", {})
        known = {f.name for f in dataclasses.fields(RCGRPOConfig)}
        values.update({k: v for k, v in saved.items() if k in known})
        origins.update({k: f"the config of checkpoint {str(checkpoint)!r}: {k}" for k in saved if k in known})
    if command.resume:
        # The run continues where it was found (a copied or moved run writes into the copy, never into
        # the output_dir stored in its checkpoint); an --output-dir flag still wins over this default.
        values["output_dir"] = _run_dir(command.resume)
        origins["output_dir"] = f"--resume {command.resume!r}"
    return values, origins


def parse_train_args(argv: list[str], prog: str = "rcgrpo train") -> tuple[TrainCommandArguments, RCGRPOConfig]:
    """(command options, config): a first pass reads --preset/--config/--resume, whose values become the
    defaults of the second pass over every flag. A config value out of range is reported under the flag
    that set it, or else the preset, YAML file (with the line) or checkpoint it came from."""
    first = build_parser((TrainCommandArguments,), prog)
    known, _ = first.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    defaults, origins = _base_values(TrainCommandArguments(**vars(known)))
    try:
        return parse((TrainCommandArguments, RCGRPOConfig), argv, prog, defaults=defaults,
                     description="RC-GRPO training of a LoRA on an image editor (FLUX.1-Kontext, Qwen-Image-Edit).")
    except ValueError as exc:
        raise _attributed(exc, argv, origins) from None


_CONFIG_ERROR = re.compile(r"^config (\w+): (.*)$", re.S)


def _attributed(exc: ValueError, argv: list[str], origins: dict) -> ValueError:
    """`exc` ("config <field>: ...") reworded to name where the field's value came from: its flag when
    it was given on the command line, else its preset, YAML file and line, or checkpoint."""
    match = _CONFIG_ERROR.match(str(exc))
    if not match:
        return exc
    name, rest = match.groups()
    spellings = {f"--{name}", f"--{name.replace('_', '-')}", f"--no-{name.replace('_', '-')}", f"--no_{name}"}
    flag = next((a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in spellings), None)
    if flag is not None:
        return ValueError(f"--{name.replace('_', '-')}: {rest}")
    if name in origins:
        return ValueError(f"{origins[name]}: {rest}")
    return exc


def main(argv: list[str], prog: str = "rcgrpo train") -> int:
    command, config = parse_train_args(argv, prog)
    import torch

    from .preflight import check_memory_fits
    from ..editors.loading import load_editor
    from ..rewards.registry import reward_funcs_from_config
    from ..train.data import build_datasets
    from ..train.trainer import RCGRPOTrainer

    check_output_dir(config.output_dir, "--output-dir")
    device = None if config.device == "auto" else config.device
    check_memory_fits(config, device)  # from the model's config files, before any weights load
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" and torch.cuda.is_available() else None
    train_set, eval_set = build_datasets(config)
    rewards = reward_funcs_from_config(config)
    editor = load_editor(config.model, device=device, dtype=dtype)
    check_memory_fits(config, editor.device, editor.pipe,  # the loaded architecture (tiny models, hub ids)
                      source_area=getattr(editor, "source_area", None))
    trainer = RCGRPOTrainer(editor, config, rewards, train_set, eval_set)
    main_process = trainer.accelerator.is_main_process
    if command.resume:
        trainer.resume(command.resume)
        changed = trainer.resume_changes
        if main_process:
            print(f"resumed from step {trainer.step}, writing to {trainer.output_dir}"
                  + ("; changed: " + ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changed.items()) if changed else ""))
    before = trainer.evaluate() if command.report else None
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    if trainer.stopped_by_signal is not None:
        if main_process:
            print(f"stopped by signal {trainer.stopped_by_signal} after step {trainer.step}; "
                  f"resume with: rcgrpo train --resume {trainer.output_dir}")
        return 0
    if main_process:
        print(f"trained {trainer.step} steps in {elapsed:.1f} s; LoRA at {trainer.output_dir / 'lora'}")
    if command.report:
        after = trainer.evaluate()
        if main_process:
            from ..train.report import write_training_report

            write_training_report(trainer, before=before, after=after, seconds=elapsed)
            print(f"held-out reward: before {before:.4f} after {after:.4f}")
    return 0


def _run_dir(resume: str) -> str:
    from pathlib import Path

    from ..train.checkpoints import CHECKPOINT_PREFIX

    path = Path(resume)
    return str(path.parent if path.name.startswith(CHECKPOINT_PREFIX) else path)
