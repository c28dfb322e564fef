"""How runs are shown: times, durations, states, node names, log lines, exit codes."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

import typer

from .errors import FAILED, OK
from .output import err, print_json

TERMINAL = ("FINISHED", "FAILED", "KILLED")
STATUSES = ("QUEUED", "STARTING", "RUNNING", "FINISHED", "FAILED", "KILLED", "LOST", "PREEMPTED")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    return _duration(time.time() - ts) + " ago"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _run_exit_code(run: dict[str, Any]) -> int:
    if run["status"] == "FINISHED":
        return OK
    code = run.get("exit_code")
    return code if isinstance(code, int) and 0 < code < 256 else FAILED


_STDOUT_RECORD = re.compile(r"^\d+\t\d+\to\t", re.M)


def write_text(text: str, ranked: bool, out: Any, err: Any) -> int | None:
    """Print a piece of text-form log records (Api.stream_log_text); returns the last record's position (None:
    no record). A piece of stdout lines only, unranked, is printed by one substitution that drops the record
    prefixes (a line holds no newline, so each record starts a line); any other is printed record by record."""
    if not text:
        return None
    last = int(text[text.rfind("\n", 0, len(text) - 1) + 1:].split("\t", 1)[0])
    if not ranked:
        plain, n = _STDOUT_RECORD.subn("", text)
        if n == text.count("\n"):
            out.write(plain)
            return last
    write_records([rec.split("\t", 3) for rec in text.split("\n")[:-1]], ranked, out, err)
    return last


def write_records(records: list[list[str]], ranked: bool, out: Any, err: Any) -> None:
    """Print text-form log records ([pos, rank, o|e|f, line]; Api.stream_log_text): stdout lines to `out`, stderr
    and the scheduler's own lines (attempt markers: never a rank's) to `err`, consecutive lines to one stream in
    one write (a write per line cost a tenth of the time)."""
    pending: list[str] = []
    target = out
    for rec in records:
        if len(rec) != 4:
            continue
        dest = out if rec[2] == "o" else err
        if dest is not target:
            target.write("".join(pending))
            pending, target = [], dest
        pending.append(f"[rank {rec[1]}] {rec[3]}\n" if ranked and rec[2] != "f" else rec[3] + "\n")
    target.write("".join(pending))


def _node(run: dict[str, Any], node_id: str | None) -> str:
    """A node as its user named it (the id where no name is known)."""
    if not node_id:
        return "-"
    return str((run.get("node_names") or {}).get(node_id) or node_id)


def _console() -> Any:
    from rich.console import Console

    # Piped output is not cut to 80 columns: ids must stay whole for scripts and greps.
    return Console() if sys.stdout.isatty() else Console(width=250)


def _styled(status: str) -> str:
    color = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "LOST": "red", "RUNNING": "cyan",
             "STARTING": "cyan", "QUEUED": "blue", "PREEMPTED": "magenta"}.get(status, "white")
    return f"[{color}]{status}[/{color}]"


def wait_ended(api: Any, run: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The run as it is once it has ended, or after `timeout` seconds (0: as given)."""
    deadline = time.monotonic() + timeout
    while run["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.1)
        run = api.get(f"/runs/{run['id']}")
    return run


def stop_said(run: dict[str, Any], *, waited: bool, as_json: bool, doc: dict[str, Any], message: str) -> None:
    """What a stop command prints (JSON or one line); exit 1 when it waited and the run has still not ended."""
    if as_json:
        print_json(doc)
    else:
        err(message)
    if waited and run["status"] not in TERMINAL:
        raise typer.Exit(FAILED)


def standing(row: dict[str, Any], now: float, *, owners: int = 3, detail: bool = False) -> tuple[str, str]:
    """A queued run's standing (a row of GET /queue) as text: who is ahead of it, and about when it starts."""
    import time

    a = row["ahead"]
    ahead = (f"{a['runs']} run(s), {a['gpus']} GPU(s): " + ", ".join(
        f"{o['owner']}{' (' + o['team'] + ')' if o.get('team') else ''} {o['runs']}/{o['gpus']} GPUs"
        for o in a["owners"][:owners])) if a["runs"] else "nobody"
    if row["start_at"] is None:
        return ahead, f"no estimate: {row['no_basis'] or '-'}"
    wait = max(0.0, row["start_at"] - now)
    if wait < 1:
        return ahead, "at the next pass"
    when = time.strftime("%H:%M", time.localtime(row["start_at"]))
    return ahead, f"in about {_duration(wait)} ({when}" + (f"; from {row['basis']})" if detail else ")")

