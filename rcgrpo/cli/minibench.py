"""`rcgrpo minibench make`: write a held-out MiniBench set in the official CompBench layout.

    rcgrpo minibench make --output-dir DIR [--split val|test] --per-task N --seed S [--size 64] [--tasks add,remove,replace]

Then `rcgrpo eval --data DIR ...` scores a model on it (see `rcgrpo.minibench.export`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from .parsing import UsageError, parse

DEFAULT_SIZE = 64  # = rcgrpo.minibench.export.DEFAULT_EXPORT_SIZE (the tiny editor's resolution); kept
# here so that `--help` imports no model code


@dataclass
class MinibenchMakeArguments:
    """Options of `rcgrpo minibench make`."""

    output_dir: str = field(metadata={"help": "directory to write (new, empty, or an earlier export with --overwrite)"})
    split: Literal["val", "test"] = field(default="val", metadata={
        "help": "held-out split: val (for choosing settings; the old 'heldout') or test (a final measurement); "
                "never sharing an example seed with each other or with train"})
    per_task: int = field(default=50, metadata={"help": "held-out examples per task"})
    seed: int = field(default=0, metadata={"help": "base seed of the held-out examples (the set is a function of it)"})
    size: int = field(default=DEFAULT_SIZE, metadata={"help": "image side in pixels (at least 16)"})
    tasks: str = field(default="add,remove,replace", metadata={"help": "comma-separated subset of add,remove,replace"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier MiniBench export in output_dir"})


def run_minibench_make(args: MinibenchMakeArguments) -> int:
    """Write the set (`rcgrpo.minibench.export.write_minibench`); prints one JSON line (output_dir, counts,
    seed, size). Bad options raise ValueError / NotADirectoryError before anything is written. Returns 0."""
    from ..minibench.export import MANIFEST, write_minibench

    out = write_minibench(args.output_dir, args.per_task, args.seed, size=args.size, tasks=args.tasks,
                          overwrite=args.overwrite, split=args.split)
    manifest = json.loads((out / MANIFEST).read_text())
    print(json.dumps({"output_dir": str(out), "split": manifest["split"], "counts": manifest["counts"],
                      "seed": manifest["seed"], "size": manifest["size"]}))
    return 0


# subcommand: (options dataclass, one-line help, runner)
SUBCOMMANDS = {"make": (MinibenchMakeArguments, "write a held-out MiniBench set in the CompBench layout",
                        run_minibench_make)}


def usage(prog: str) -> str:
    lines = [f"usage: {prog} <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text, _run) in SUBCOMMANDS.items()]
    lines += ["", f"{prog} <subcommand> --help shows its options."]
    return "\n".join(lines)


def main(argv: list[str], prog: str = "rcgrpo minibench") -> int:
    """`rcgrpo minibench <subcommand> [options]`."""
    argv = list(argv)
    if not argv:
        raise UsageError(f"{prog}: choose a subcommand: {', '.join(SUBCOMMANDS)} (see {prog} --help)")
    if argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        raise UsageError(f"{prog}: invalid choice: {name!r} (choose from {', '.join(SUBCOMMANDS)})")
    args_class, help_text, run = SUBCOMMANDS[name]
    return run(parse((args_class,), argv[1:], f"{prog} {name}", description=help_text))


__all__ = ["MinibenchMakeArguments", "SUBCOMMANDS", "main", "run_minibench_make"]
