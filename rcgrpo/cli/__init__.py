"""`rcgrpo` command line: one module per command, each exposing `main(argv, prog) -> int`.

Exit status 2 for bad input (usage, files, config), 1 for a failure while running; errors are one
readable line on stderr, the traceback only with `--debug` (or RCGRPO_DEBUG=1). `rcgrpo --help` and
`rcgrpo <command> --help` import no model code.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
import warnings

from .parsing import UsageError

# command: (module, one-line help)
COMMANDS = {
    "edit": ("rcgrpo.cli.edit", "edit an image with an RDP group (global vs RDP side by side)"),
    "train": ("rcgrpo.cli.train", "RC-GRPO training of a LoRA"),
    "eval": ("rcgrpo.cli.eval", "CompBench metrics (official conventions) of a model or of existing edits"),
    "dryrun": ("rcgrpo.cli.dryrun", "one iteration of a full-size model with random weights: time and memory"),
    "diagnostics": ("rcgrpo.cli.diagnostics", "the paper's Fig. 5 (ECDFs of background drift and reward std) "
                    "from runs' metrics.jsonl"),
    "minibench": ("rcgrpo.cli.minibench", "MiniBench tools: `make` writes a held-out set in the CompBench layout"),
    "ablate": ("rcgrpo.cli.ablate", "the paper's Table 2 ablation and Fig. 5 on MiniBench (several seeds, one budget)"),
    "study": ("rcgrpo.cli.study", "the MiniBench validation study: configurations of a plan file, one run each"),
    "pretrain-tiny": ("rcgrpo.cli.pretrain", "train the tiny MiniBench editor from a seed (reproduces tiny-editor)"),
}

def register_offline_models() -> None:
    """The command line wires the offline models, dataset and reward into the core's registries:
    `--model tiny | tiny-qwen | tiny-qwen-plus` (rcgrpo.testing), `tiny-editor`, `dataset: minibench` and
    `reward_funcs: [minibench]` (rcgrpo.minibench). The core never imports either package."""
    importlib.import_module("rcgrpo.testing")
    importlib.import_module("rcgrpo.minibench")


BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, KeyError)


def usage_line() -> str:
    return "rcgrpo [--debug] [--version] <command> [options]"


def usage() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("rcgrpo")
    except PackageNotFoundError:
        ver = "unknown"
    lines = [f"usage: {usage_line()}   (rcgrpo {ver})", "",
             "Region-constrained GRPO post-training of flow-based image editors (FLUX.1-Kontext).", "",
             "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "rcgrpo <command> --help shows the command's options and their defaults."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("RCGRPO_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        if not argv:
            raise UsageError(f"rcgrpo: error: no command given (usage: {usage_line()}; commands: "
                             f"{', '.join(COMMANDS)}; `rcgrpo --help` describes them)")
        if argv[0] in ("-h", "--help"):
            print(usage())
            return 0
        if argv[0] == "--version":
            print(usage().splitlines()[0].split("(")[-1].rstrip(")"))
            return 0
        name = argv[0]
        if name not in COMMANDS:
            raise UsageError(f"rcgrpo: invalid choice: {name!r} (choose from {', '.join(COMMANDS)})")
        module = importlib.import_module(COMMANDS[name][0])
        asks_help = any(a in ("-h", "--help") for a in argv[1:])
        if not debug and not asks_help:  # --help stays fast: diffusers is not imported for it
            _quiet_libraries()
        if not asks_help:
            register_offline_models()
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning
            if hasattr(module, "main"):
                return int(module.main(argv[1:], prog=f"rcgrpo {name}") or 0)
            return _run_argparse_command(module, name, argv[1:])
    except SystemExit as exc:  # --help of a command
        return exc.code if isinstance(exc.code, int) else 0
    except (UsageError, *BAD_INPUT_ERRORS) as exc:
        _report(exc, debug)
        return 2
    except KeyboardInterrupt:
        print("rcgrpo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        _report(exc, debug)
        return 1


def _run_argparse_command(module, name: str, argv: list[str]) -> int:
    """A command module that still defines `add_<name>_arguments(parser)` and `run_<name>(args)`."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(f"{self.prog}: {message}")

    parser = Parser(prog=f"rcgrpo {name}")
    getattr(module, f"add_{name}_arguments")(parser)
    return int(getattr(module, f"run_{name}")(parser.parse_args(argv)) or 0)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Python warnings as one `rcgrpo: warning: ...` line on stderr (the location only with --debug)."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"rcgrpo: warning: {text}", file=file or sys.stderr)


def _quiet_libraries() -> None:
    """Keep diffusers/transformers info and warnings (torchvision hints, prompt truncation) off the CLI."""
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" bars
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging tweaks must never break the CLI
        pass


def _report(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, KeyError):
        message = f"missing key {message}"
    prefix = "" if message.startswith("rcgrpo") else "rcgrpo: error: "
    print(prefix + message, file=sys.stderr)


__all__ = ["COMMANDS", "UsageError", "main"]
