"""The `fedml` command's entry point. `fedml --help` prints the help that `make install` rendered (the same text
typer renders: a test compares them) when it still fits the installed code; everything else, and a stale or
missing rendering, goes to the CLI itself (fedml_cli.main).

Why: rendering the top-level help imports typer and click and builds every command, ~0.1 s; the interpreter
alone starts in ~0.016 s. Only os and sys are imported here.
"""

from __future__ import annotations

import os
import sys

HELP_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "help.cache")  # gitignored, made by install
WIDTH = 80  # click renders help at min(terminal width, 80) columns: any terminal at least this wide looks alike


def fingerprint() -> str:
    """What the rendered help depends on: this package's sources (name, size, mtime) and the interpreter."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = [sys.version]
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(here, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _columns() -> int:
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return WIDTH  # not a terminal: click renders at 80


def cached_help() -> str | None:
    """The rendered help if it is there, fits the installed code, and this terminal is wide enough."""
    if _columns() < WIDTH:
        return None
    try:
        with open(HELP_CACHE, encoding="utf-8") as f:
            stamp, _, text = f.read().partition("\n")
    except OSError:
        return None
    return text if stamp == fingerprint() else None


def render_help() -> str:
    """The top-level help as typer renders it at WIDTH columns."""
    from typer.testing import CliRunner

    from .main import app

    got = CliRunner().invoke(app, ["--help"], prog_name="fedml", terminal_width=WIDTH - 2)
    if got.exit_code != 0:
        raise RuntimeError(f"fedml --help exited {got.exit_code}: {got.output}")
    return got.output


def write_help_cache() -> None:
    text = render_help()
    tmp = HELP_CACHE + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(fingerprint() + "\n" + text)
    os.replace(tmp, HELP_CACHE)


def main() -> None:
    if sys.argv[1:] in (["--version"], ["version"]):  # (FedML's scripts ask the first way)
        from scheduler.contract import __version__

        sys.stdout.write(f"fedml launch {__version__}\n")
        return
    if sys.argv[1:] in (["--help"], ["-h"]):
        text = cached_help()
        if text is not None:
            sys.stdout.write(text)
            return
    from .main import main as cli

    cli()


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-help-cache"]:
        write_help_cache()
    else:
        main()
