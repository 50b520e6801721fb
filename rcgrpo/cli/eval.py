"""`rcgrpo eval`: CompBench metrics of a model (or of existing edits) → results.json, results.md.

The options are the fields of `EvalArguments`, parsed by `transformers.HfArgumentParser`
(`parse_eval_args(argv)`; `main(argv)` parses with `rcgrpo.cli.parsing` as the other commands do);
`run_eval(EvalArguments)` runs the command. A missing or unreadable source, mask or edit is an error
naming the example unless `--skip-missing` is given. `add_eval_arguments(parser)` adds
the same options to an argparse (sub)parser for the `rcgrpo` dispatcher, and `run_eval` also accepts the
namespace that parser returns.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields
from typing import Literal, Sequence

from ..eval.constants import DEFAULT_CLIP_MODEL, EVAL_SIZE, TASKS


@dataclass
class EvalArguments:
    """Options of `rcgrpo eval` (each field is a `--field-name` flag)."""

    data: str = field(metadata={"help": "CompBench directory (holding tasks/<task>/metadata.json, or the tasks/ folder)"})
    output_dir: str = field(metadata={"help": "where outputs/, results.json and results.md go"})
    model: str | None = field(default=None, metadata={
        "help": "model to generate the edits with: tiny | tiny-editor | PATH | HUB_ID"})
    tiny: bool = field(default=False, metadata={"help": "deprecated: the same as --model tiny"})
    lora: str | None = field(default=None, metadata={
        "help": "diffusers-format LoRA (a directory with pytorch_lora_weights.safetensors, or the file)"})
    outputs: str | None = field(default=None, metadata={
        "help": "score existing edits at DIR/<task>/<image_path> instead of generating "
                "(the official editing_results/<model>/<model>_local folder)"})
    tasks: str | None = field(default=None, metadata={"help": f"comma-separated tasks (default {','.join(TASKS)})"})
    limit: int | None = field(default=None, metadata={"help": "at most N examples per task (metadata order)"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the model's)"})
    guidance_scale: float | None = field(default=None, metadata={"help": "Kontext guidance (default: the model's)"})
    resolution: int | None = field(default=None, metadata={"help": "edit at N×N px (default: the model's)"})
    max_sequence_length: int | None = field(default=None, metadata={"help": "T5 text length (default: the model's)"})
    seed: int = field(default=0, metadata={"help": "generation seed (per example: from the seed and the example id)"})
    stale_outputs: Literal["regenerate", "refuse"] = field(default="regenerate", metadata={
        "help": "an edit in OUTPUT_DIR/outputs generated with other settings, model or LoRA weights: "
                "regenerate it, or refuse to run"})
    clip_model: str = field(default=DEFAULT_CLIP_MODEL, metadata={"help": "CLIP hub id or local path for LC-T / LC-I"})
    lpips_weights: str | None = field(default=None, metadata={
        "help": "LPIPS-squeeze weights (.safetensors from rcgrpo.eval.lpips.export_lpips_weights); "
                "default: torchmetrics' network (needs torchvision)"})
    eval_size: int = field(default=EVAL_SIZE, metadata={"help": f"metric resolution (default {EVAL_SIZE}, as CompBench)"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)"})
    strict: bool = field(default=False, metadata={"help": "fail when CLIP or LPIPS weights are unavailable"})
    skip_missing: bool = field(default=False, metadata={
        "help": "skip examples whose source, mask or edit is missing or unreadable, as the official script does: "
                "they are counted, listed in results.md and a warning gives their number (default: such an "
                "example is an error naming it)"})
    fail_on_skipped: bool = field(default=False, metadata={
        "help": "the default behaviour (kept for old command lines): a missing or unreadable file is an error"})

    def __post_init__(self):
        if self.tiny:
            if self.model not in (None, "tiny"):
                raise ValueError(f"--tiny (deprecated, = --model tiny) contradicts --model {self.model}")
            print("rcgrpo eval: --tiny is deprecated; use --model tiny", file=sys.stderr)
            self.model, self.tiny = "tiny", False
        if self.skip_missing and self.fail_on_skipped:
            raise ValueError("--skip-missing contradicts --fail-on-skipped; give one of them")
        for name in ("limit", "steps", "resolution", "max_sequence_length", "eval_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")

    def task_list(self) -> list[str] | None:
        """`tasks` as a list (None: every task present); ValueError for names outside add/remove/replace."""
        if self.tasks is None:
            return None
        tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        bad = [t for t in tasks if t not in TASKS]
        if not tasks or bad:
            raise ValueError(f"--tasks: expected a comma-separated subset of {','.join(TASKS)}, got {self.tasks!r}")
        return tasks


def _parser():
    from transformers import HfArgumentParser

    return HfArgumentParser(EvalArguments)


def parse_eval_args(argv: Sequence[str] | None = None) -> EvalArguments:
    """`EvalArguments` from command-line arguments (HfArgumentParser)."""
    (args,) = _parser().parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return args


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `EvalArguments` options, as HfArgumentParser builds them, to an argparse (sub)parser."""
    for action in _parser()._actions:
        if not isinstance(action, argparse._HelpAction):
            parser._add_action(action)


def _as_arguments(args) -> EvalArguments:
    if isinstance(args, EvalArguments):
        return args
    return EvalArguments(**{f.name: getattr(args, f.name) for f in fields(EvalArguments) if hasattr(args, f.name)})


def main(argv: list[str], prog: str = "rcgrpo eval") -> int:
    """`rcgrpo eval` from the dispatcher: flags parsed by `rcgrpo.cli.parsing` (finite floats, one-line
    errors), then `run_eval`."""
    from .parsing import parse

    return run_eval(parse((EvalArguments,), argv, prog, description=__doc__.splitlines()[0]), prog)


def run_eval(args, prog: str = "rcgrpo eval") -> int:
    """Run `rcgrpo eval` (an `EvalArguments`, or the dispatcher's namespace); prints the Markdown table.
    Returns 0.

    Bad input (missing or unreadable files unless `skip_missing`, bad metadata, bad options) raises
    ValueError / FileNotFoundError (exit 2 in the CLI); failures while running raise other exceptions
    (exit 1). Skipped examples (`skip_missing`) give one warning line on stderr with their number.
    """
    from ..eval.evaluate import evaluate
    from ..eval.results import format_markdown

    args = _as_arguments(args)
    results = evaluate(args.data, args.output_dir, model=args.model, lora=args.lora, outputs_dir=args.outputs,
                       tasks=args.task_list(), steps=args.steps, guidance_scale=args.guidance_scale,
                       resolution=args.resolution, max_sequence_length=args.max_sequence_length, seed=args.seed,
                       limit=args.limit, stale_outputs=args.stale_outputs, clip_model=args.clip_model,
                       lpips_weights=args.lpips_weights, strict=args.strict, fail_on_skipped=not args.skip_missing,
                       eval_size=args.eval_size, device=args.device)
    print(format_markdown(results), end="")
    skipped = results.get("skipped", [])
    if skipped:
        total = results.get("average", {}).get("count", 0) + len(skipped)
        print(f"{prog}: warning: {len(skipped)} of {total} example(s) skipped (missing or unreadable files, "
              f"e.g. {skipped[0]['id']}); listed in {args.output_dir}/results.md", file=sys.stderr)
    return 0


__all__ = ["EvalArguments", "add_eval_arguments", "main", "parse_eval_args", "run_eval"]
