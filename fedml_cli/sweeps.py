"""Sweeps on the command line: `fedml launch --sweep lr=0.1,0.01 [--max-parallel N]` (or `sweep:` in the job),
the sweep as one row of `fedml run list`, `fedml run status|stop|retry SWEEP_ID`. The scheduler makes the runs
(GET /sweeps/ID: the sweep with each point's latest run). Imported inside commands only."""

from __future__ import annotations

import sys
import time
from typing import Any

from .errors import FAILED, INTERRUPTED, USAGE, CliError


def is_sweep(ident: str | None) -> bool:
    return bool(ident) and str(ident).startswith("sweep-")


def _value(text: str) -> Any:
    """A --sweep value as YAML would read a plain scalar: 3 and 0.1 are numbers, true/false booleans, the rest
    text."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse(options: list[str] | None) -> dict[str, list[Any]]:
    """--sweep NAME=V1,V2,... (repeatable) as {name: [values]}. CliError(USAGE) naming the bad option."""
    grid: dict[str, list[Any]] = {}
    for opt in options or []:
        name, sep, values = opt.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise CliError(f'--sweep: expected NAME=VALUE,VALUE..., got "{opt[:80]}"', USAGE)
        if name.strip() in grid:
            raise CliError(f"--sweep: {name.strip()} is given twice", USAGE)
        grid[name.strip()] = [_value(v) for v in values.split(",")]
    return grid


def summary_line(s: dict[str, Any]) -> str:
    counts = s["counts"]
    parts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{s['done']}/{s['size']} done ({parts})"


def watch(api: Any, sweep_id: str, *, as_json: bool, stop_on_interrupt: bool) -> int:
    """Wait for every point to end, saying each change of the counts; then the table. Exit code: 0 when all
    finished, 1 otherwise (130 when interrupted; the sweep goes on unless stop_on_interrupt)."""
    said = ""
    try:
        while True:
            s = api.get(f"/sweeps/{sweep_id}")
            line = summary_line(s)
            if line != said and not as_json:
                sys.stderr.write(f"sweep {sweep_id}: {line}\n")
                said = line
            if s["done"] == s["size"]:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        if stop_on_interrupt:
            api.post(f"/sweeps/{sweep_id}/stop")
            sys.stderr.write(f"sweep {sweep_id}: stop requested\n")
        else:
            sys.stderr.write(f"stopped following; the sweep goes on (`fedml run status {sweep_id}`)\n")
        return INTERRUPTED
    show(s, as_json=as_json)
    return 0 if all(r["status"] == "FINISHED" for r in s["runs"]) else FAILED


def show(s: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        from .output import print_json

        print_json(s)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=250)
    mp = f", at most {s['max_parallel']} at once" if s.get("max_parallel") else ""
    console.print(f"[bold]sweep[/bold] {s['id']} ({escape(s['name'])}): {s['size']} points{mp}; "
                  f"{summary_line(s)}" + (f"; {s['retried']} retried" if s.get("retried") else ""), highlight=False)
    table = Table(box=None, header_style="bold")
    for col in ("#", "RUN", "POINT", "STATUS", "EXIT", "REASON"):
        table.add_column(col)
    for r in s["runs"]:
        point = " ".join(f"{k}={v}" for k, v in (r["sweep"]["point"] or {}).items())
        table.add_row(str(r["sweep"]["index"]), r["id"], escape(point), r["status"],
                      "-" if r.get("exit_code") is None else str(r["exit_code"]), escape(r.get("reason") or ""))
    console.print(table)


def grouped(runs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any] | list[dict[str, Any]]]]:
    """`fedml run list` rows: a run alone, or a sweep's runs as one row (in the place of its newest)."""
    out: list[tuple[str, Any]] = []
    at: dict[str, int] = {}
    for r in runs:
        sid = (r.get("sweep") or {}).get("id")
        if sid is None:
            out.append(("run", r))
        elif sid in at:
            out[at[sid]][1].append(r)
        else:
            at[sid] = len(out)
            out.append(("sweep", [r]))
    return out
