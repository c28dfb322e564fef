"""What every command prints the same way: one-line errors on stderr, JSON on stdout, the --json option."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .errors import CliError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def err(msg: str) -> None:
    # A message may quote what a file held, lone surrogates included (YAML's "\ud800" escape): written as
    # escapes, so that any stream takes it (a strict one raised UnicodeEncodeError: a traceback, not the error).
    sys.stderr.write(msg.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
    sys.stderr.flush()


def fail(exc: CliError) -> typer.Exit:
    """Say what went wrong in one line; the exit the command raises carries the error's code."""
    err(f"error: {exc}")
    return typer.Exit(exc.code)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


class Group(TyperGroup):
    """The `fedml` command group: a CliError from any command, at any depth, is one line on stderr and its exit
    code (commands raise it and never catch it just to print it)."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as exc:
            raise fail(exc) from None
