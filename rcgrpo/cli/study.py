"""`rcgrpo study`: the MiniBench validation study of a plan file (rcgrpo.minibench.study): every configuration
one resumable one-thread run on the validation split, `--parallel` at a time; results.json and results.md.

    rcgrpo study --plan benchmarks/protocols/minibench-study-2026-12-07.yaml --output-dir runs/study
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .parsing import parse
from .validation import check_output_dir


@dataclass
class StudyOptions:
    plan: str = field(metadata={"help": "YAML plan: common overrides, evaluation, configurations (see "
                                        "rcgrpo.minibench.study)"})
    output_dir: str = field(default="runs/study", metadata={"help": "runs/, data/, results.json and results.md"})
    parallel: int = field(default=2, metadata={"help": "runs at a time, one thread each"})


def main(argv: list[str], prog: str = "rcgrpo study") -> int:
    opts = parse((StudyOptions,), argv, prog, description=__doc__.splitlines()[0])
    if opts.parallel < 1:
        raise ValueError(f"--parallel: expected an int ≥ 1, got {opts.parallel}")
    from ..minibench.study import plan_specs, read_plan, run_study

    plan_specs(read_plan(opts.plan))  # every configuration checked before any run starts
    check_output_dir(opts.output_dir, "--output-dir")
    results = run_study(opts.plan, opts.output_dir, parallel=opts.parallel, log=lambda msg: print(msg, flush=True))
    from ..minibench.study import format_study

    print(format_study(results), end="")
    return 0
