"""Flags from dataclasses: `transformers.HfArgumentParser`, with errors as one readable line.

Every command describes its options as dataclasses whose fields carry `metadata={"help": ...}`:
`--field-name` and `--field_name` both work, booleans are switches (`--flag`, `--no-flag` for those
that default to true, or `--flag true|false`), `Literal` types list their choices, lists take several
values, and `--help` shows every default. Float options take finite numbers only (`nan`, `inf` and
`-inf` are refused while parsing, naming the flag). Bad usage raises `UsageError` (exit status 2 in
`rcgrpo`).
"""
from __future__ import annotations

import argparse
import math
import re

from transformers import HfArgumentParser

_INVALID = re.compile(r"argument (--[\w.]+)(?:/(--[\w.-]+))?: invalid (\w+) value: (.*)")
_CHOICE = re.compile(r"argument (--[\w.]+)(?:/(--[\w.-]+))?: invalid choice: (.*)")
_OTHER = re.compile(r"argument (--[\w.]+)(?:/(--[\w.-]+))?: (.*)")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def finite_float(text) -> float:
    """argparse type of float options: a finite number (`nan`, `inf`, `-inf` refused)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected float, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class CommandParser(HfArgumentParser):
    """HfArgumentParser whose errors raise `UsageError` with the flag spelled with dashes, and whose float
    options refuse non-finite numbers."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        for action in self._actions:
            if action.type is float:
                action.type = finite_float

    def error(self, message):  # argparse would print the usage and exit by itself
        match = _INVALID.match(message)
        if match:
            flag = match.group(2) or match.group(1)
            message = f"{flag}: expected {match.group(3)}, got {match.group(4)}"
        match = _CHOICE.match(message)
        if match:
            message = f"{match.group(2) or match.group(1)}: invalid choice: {match.group(3)}"
        match = _OTHER.match(message)
        if match:
            message = f"{match.group(2) or match.group(1)}: {match.group(3)}"
        raise UsageError(f"{self.prog}: {message}")


def build_parser(dataclass_types, prog: str, description: str | None = None) -> CommandParser:
    return CommandParser(tuple(dataclass_types), prog=prog, description=description)


def parse(dataclass_types, argv: list[str], prog: str, description: str | None = None, defaults: dict | None = None):
    """The dataclass instances for `argv` (a 1-tuple unpacks to the instance). `defaults` override the
    dataclasses' own defaults (a preset or YAML file under the flags)."""
    parser = build_parser(dataclass_types, prog, description)
    if defaults:
        parser.set_defaults(**defaults)
    parsed = parser.parse_args_into_dataclasses(args=list(argv))
    return parsed[0] if len(parsed) == 1 else parsed


__all__ = ["CommandParser", "UsageError", "build_parser", "finite_float", "parse"]
