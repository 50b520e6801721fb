"""`rcgrpo eval`: CompBench metrics of a model (or of existing edits) → results.json, results.md."""
from __future__ import annotations

import argparse

from ..eval.compbench import TASKS
from ..eval.evaluate import TINY_RESOLUTION, evaluate
from ..eval.metrics import EVAL_SIZE
from ..eval.results import format_markdown
from ..rewards.clip import DEFAULT_CLIP_MODEL


def _tasks_arg(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if not tasks or bad:
        raise argparse.ArgumentTypeError(f"--tasks: expected a comma-separated subset of {','.join(TASKS)}, got {text!r}")
    return tasks


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `rcgrpo eval` options."""
    parser.add_argument("--data", required=True, help="CompBench directory (holding tasks/<task>/metadata.json)")
    parser.add_argument("--output-dir", required=True, help="where outputs/, results.json and results.md go")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="FluxKontextPipeline hub id or local path to generate edits with")
    src.add_argument("--tiny", action="store_true", help="generate with the tiny offline test pipeline")
    parser.add_argument("--lora", default=None, help="diffusers-format LoRA (directory with pytorch_lora_weights.safetensors)")
    parser.add_argument("--outputs", default=None, help="score existing edits at DIR/<task>/<image_path> instead of generating")
    parser.add_argument("--tasks", type=_tasks_arg, default=None, help="comma-separated tasks (default add,remove,replace)")
    parser.add_argument("--steps", type=_positive_int, default=28, help="sampling steps (default 28)")
    parser.add_argument("--guidance-scale", type=float, default=2.5, help="Kontext guidance (default 2.5)")
    parser.add_argument("--resolution", type=_positive_int, default=None,
                        help=f"edit at N×N px (default: the pipeline's choice; {TINY_RESOLUTION} with --tiny)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (per example: seed and example id)")
    parser.add_argument("--limit", type=_positive_int, default=None, help="at most N examples per task")
    parser.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"CLIP hub id or local path (default {DEFAULT_CLIP_MODEL})")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS-squeeze weights (.safetensors; see rcgrpo.evaluation)")
    parser.add_argument("--eval-size", type=_positive_int, default=EVAL_SIZE, help=f"metric resolution (default {EVAL_SIZE}, as CompBench)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--strict", action="store_true", help="fail when CLIP or LPIPS weights are unavailable")


def run_eval(args) -> int:
    """Run `rcgrpo eval` from parsed arguments; prints the Markdown table. Returns 0.

    Bad input (missing files, bad metadata, bad options) raises ValueError / FileNotFoundError (exit 2 in
    the CLI); failures while running raise other exceptions (exit 1).
    """
    results = evaluate(args.data, args.output_dir, model=args.model, tiny=args.tiny, lora=args.lora,
                       outputs_dir=args.outputs, tasks=args.tasks, steps=args.steps,
                       guidance_scale=args.guidance_scale, resolution=args.resolution, seed=args.seed,
                       limit=args.limit, clip_model=args.clip_model, lpips_weights=args.lpips_weights,
                       strict=args.strict, eval_size=args.eval_size, device=args.device)
    print(format_markdown(results), end="")
    return 0
