"""`rcgrpo diagnostics`: the paper's Fig. 5 (ECDFs of background drift and within-group reward std)
from the `metrics.jsonl` of one or more runs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .parsing import parse


@dataclass
class DiagnosticsArguments:
    run: list[str] = field(metadata={"help": "LABEL=PATH (a metrics.jsonl or a run directory); repeat a label to "
                                             "pool runs, e.g. --run global=runs/g rdp=runs/r"})
    output: str = field(default="fig5.png", metadata={"help": "PNG to write"})
    linear_drift: bool = field(default=False, metadata={"help": "linear (not log) x axis for the drift"})


def runs_from_args(items: list[str]) -> dict[str, list[str]]:
    runs: dict[str, list[str]] = {}
    for text in items:
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--run expects LABEL=PATH, got {text!r}")
        runs.setdefault(label, []).append(path)
    return runs


def merge_repeated(argv: list[str], flag: str) -> list[str]:
    """`--run a --run b c` as `--run a b c` (a list flag given several times keeps every value)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return rest + ([flag, *values] if values else [])


def main(argv: list[str], prog: str = "rcgrpo diagnostics") -> int:
    args = parse((DiagnosticsArguments,), merge_repeated(argv, "--run"), prog, description=__doc__.splitlines()[0])
    runs = runs_from_args(args.run)
    from ..train.diagnostics import plot_fig5

    summary = plot_fig5(runs, args.output, log_drift=not args.linear_drift)
    print(json.dumps(summary, indent=2))
    return 0
