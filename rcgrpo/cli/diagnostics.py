"""`rcgrpo diagnostics`: the paper's Fig. 5 (ECDFs of background drift and within-group reward std)
from the `metrics.jsonl` of one or more runs."""
from __future__ import annotations

import argparse
import json

from ..train.diagnostics import plot_fig5


def _run_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"--run expects LABEL=PATH, got {text!r}")
    return label, path


def add_diagnostics_arguments(parser) -> None:
    parser.add_argument("--run", type=_run_arg, action="append", required=True,
                        help="LABEL=PATH (metrics.jsonl or run directory); repeat a label to pool runs")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--linear-drift", action="store_true", help="linear (not log) x axis for the drift")


def run_diagnostics(args) -> int:
    runs: dict[str, list[str]] = {}
    for label, path in args.run:
        runs.setdefault(label, []).append(path)
    summary = plot_fig5(runs, args.output, log_drift=not args.linear_drift)
    print(json.dumps(summary, indent=2))
    return 0
