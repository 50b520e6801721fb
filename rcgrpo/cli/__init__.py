"""`rcgrpo` command line: edit, train, eval, dryrun, diagnostics.

Exit status 2 for bad input (usage, files, config), 1 for a failure while running; errors are one
readable line on stderr, the traceback only with `--debug`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# command: (module, function adding its arguments, function running it, help)
COMMANDS = {
    "edit": ("rcgrpo.cli.edit", "add_edit_arguments", "run_edit", "edit an image with an RDP group (global vs RDP)"),
    "train": ("rcgrpo.cli.train", "add_train_arguments", "run_train", "RC-GRPO training (LoRA)"),
    "eval": ("rcgrpo.cli.eval", "add_eval_arguments", "run_eval", "CompBench-style evaluation"),
    "dryrun": ("rcgrpo.cli.dryrun", "add_dryrun_arguments", "run_dryrun",
               "one iteration of a full-size model with random weights"),
    "diagnostics": ("rcgrpo.cli.diagnostics", "add_diagnostics_arguments", "run_diagnostics",
                    "the paper's Fig. 5 (ECDFs of background drift and reward std) from runs' metrics.jsonl"),
}

BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit itself
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rcgrpo", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    for name, (module, add_fn, _run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        p.set_defaults(_command=name)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=f"the '{name}' command is not available in this build")
            continue
        getattr(mod, add_fn)(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("RCGRPO_DEBUG") == "1"
    if not debug:
        _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "command", None) is None:
            raise UsageError("rcgrpo: choose a command: " + ", ".join(COMMANDS) + " (see rcgrpo --help)")
        if getattr(args, "_missing", None):
            raise UsageError(args._missing)
        module, _add, run_fn, _help = COMMANDS[args._command]
        return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
    except UsageError as exc:
        _report(exc, debug)
        return 2
    except BAD_INPUT_ERRORS as exc:
        _report(exc, debug)
        return 2
    except KeyboardInterrupt:
        print("rcgrpo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        _report(exc, debug)
        return 1


def _quiet_libraries() -> None:
    """Keep diffusers/transformers info and warnings (torchvision hints, prompt truncation) off the CLI."""
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - logging tweaks must never break the CLI
        pass


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, KeyError):
        message = f"missing key {message}"
    prefix = "" if message.startswith("rcgrpo") else "rcgrpo: error: "
    print(prefix + message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
