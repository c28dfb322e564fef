"""`fedml logs` and `fedml run list|status|stop|artifacts`."""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import NOT_FOUND, OK, USAGE, CliError
from .fedml_names import fedml_status
from .follow import _follow
from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json
from .show import (
    STATUSES,
    TERMINAL,
    _ago,
    _console,
    _duration,
    _node,
    _styled,
    standing,
    stop_said,
    wait_ended,
    write_text,
)

run_app = typer.Typer(help="Inspect and stop runs.", no_args_is_help=True, rich_markup_mode=None)

# FedML's ways to name a run (its scripts and docs pass them), beside the RUN_ID argument.
RunIdOpt = Annotated[str | None, typer.Option("--run_id", "--run-id", "-rid", "--job_id", "-jid", metavar="RUN_ID",
                                              help="The run (FedML's flag: the same as the RUN_ID argument; "
                                                   "-jid is FedML's older name).")]
RunNameOpt = Annotated[str | None, typer.Option("--run_name", "--run-name", "-r", metavar="NAME",
                                                help="The newest run with this name (among the newest 10,000).")]


def which_run(api: Any, arg: str | None, rid: str | None, name: str | None = None) -> str:
    """The run a command names: RUN_ID, -rid RUN_ID or -r NAME (one of them)."""
    given = {x for x in (arg, rid) if x}
    if len(given) > 1 or (given and name):
        raise CliError("name the run once: RUN_ID, -rid RUN_ID or -r NAME", USAGE)
    if given:
        return given.pop()
    if name:
        named = api.runs_named(name)
        if not named:
            raise CliError(f"no run named {name}", NOT_FOUND)
        return str(named[0]["id"])  # newest first
    raise CliError("which run? give RUN_ID, -rid RUN_ID or -r NAME", USAGE)


# ---- logs --------------------------------------------------------------------------------------------------

def logs(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", min=0, help="Only the last N lines.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", min=0, help="Only lines of this rank.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a run's log, during or after the run. With -f, exits with the run's exit code when it ends.

    Lines of multi-node runs are prefixed with their rank; --rank N shows one rank only.
    """
    from .api import connect

    api = connect()
    ranked = rank is None and api.get(f"/runs/{run_id}").get("num_nodes", 1) > 1
    if follow:
        code = _follow(api, run_id, as_json=as_json, tail=tail, rank=rank, ranked=ranked)
        raise typer.Exit(0 if code == OK or as_json else code)
    if not as_json:  # the text form: a split per line where NDJSON costs a JSON object
        for got in api.stream_log_text(run_id, tail=tail, rank=rank):
            if isinstance(got, dict):
                break
            write_text(got, ranked, sys.stdout, sys.stderr)
        return
    pending: list[str] = []
    for rec in api.stream_logs(run_id, tail=tail, rank=rank):
        if rec.get("end"):
            break
        pending.append(json.dumps(rec) + "\n")
        if len(pending) >= 4096:  # a write per line cost a tenth of the time
            sys.stdout.write("".join(pending))
            pending = []
    sys.stdout.write("".join(pending))


@run_app.command("logs")
def run_logs(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN_ID]")] = None,
    rid: RunIdOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the run ends.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", min=0, help="Only the last N lines.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", min=0, help="Only lines of this rank.")] = None,
    page_num: Annotated[int | None, typer.Option("--page_num", "-pn", min=1,
                                                 help="FedML's paging: this page of the log (from 1).")] = None,
    page_size: Annotated[int | None, typer.Option("--page_size", "-ps", min=1,
                                                  help="FedML's paging: lines per page (default 10).")] = None,
    need_all_logs: Annotated[bool, typer.Option("--need_all_logs", "-a", help="Every line (the default here; "
                                                                              "FedML shows one page).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The same as `fedml logs RUN_ID`, with FedML's flags (`fedml run logs -rid RUN_ID`, what FedML prints after
    a launch); -pn/-ps show one page of the log."""
    from .api import connect

    api = connect()
    run_id = which_run(api, run_id, rid)
    if (page_num is None and page_size is None) or need_all_logs:
        logs(run_id, follow=follow, tail=tail, rank=rank, as_json=as_json)
        return
    if follow or tail is not None:
        raise CliError("-pn/-ps show one page: not with --follow or --tail", USAGE)
    size = page_size or 10
    for rec in api.log_page(run_id, page_num or 1, size, rank):
        sys.stdout.write((json.dumps(rec) if as_json else rec["line"]) + "\n")


# ---- run ---------------------------------------------------------------------------------------------------

def _status_arg(status: list[str] | None) -> list[str]:
    out = []
    for s in status or []:
        for part in s.split(","):
            up = part.strip().upper()
            if up not in STATUSES:
                _err(f'error: --status: unknown status "{part}"; one of {", ".join(STATUSES)}')
                raise typer.Exit(USAGE)
            out.append(up)
    return out


@run_app.command("list")
def run_list(
    status: Annotated[list[str] | None, typer.Option("--status", "-s", help="Only runs in this state; repeatable.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (newest first).")] = 100,
    run_name: Annotated[str | None, typer.Option("--run_name", "--run-name", "-r", metavar="NAME",
                                                 help="Only runs with this name.")] = None,
    rid: Annotated[str | None, typer.Option("--run_id", "--run-id", "-rid", metavar="RUN_ID",
                                            help="Only this run.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    wanted = _status_arg(status)
    from .api import connect

    api = connect()
    if rid:
        runs = [api.get(f"/runs/{rid}")]
        runs = [r for r in runs if not wanted or r["status"] in wanted]
    elif run_name:
        runs = api.runs_named(run_name, wanted)[:limit]
    else:
        runs = api.get("/runs", params={"status": wanted, "limit": limit})
    if as_json:
        _print_json([{**r, "fedml_status": fedml_status(r)} for r in runs])
        return
    from rich.table import Table

    from . import sweeps

    table = Table(box=None, header_style="bold")
    for col in ("RUN", "NAME", "STATUS", "NODE", "CREATED", "DURATION", "EXIT", "GPU-HOURS", "COST"):
        table.add_column(col)
    for kind, item in sweeps.grouped(runs):
        if kind == "sweep":  # a sweep's points as one row: `fedml run status SWEEP_ID` lists them
            pts = item
            states = Counter(p["status"] for p in pts)
            size = pts[0]["sweep"]["size"]
            table.add_row(pts[0]["sweep"]["id"], pts[0]["name"],
                          f"SWEEP {size} points: " + ", ".join(f"{n} {st.lower()}" for st, n in states.most_common()),
                          "-", _ago(min(p["created_at"] for p in pts)), "-", "-",
                          *_spent(sum((p.get("spent") or {}).get(k, 0.0) for p in pts) for k in ("gpu_seconds", "cost")))
            continue
        r = item
        dur = ((r.get("ended_at") or time.time()) - r["started_at"]) if r.get("started_at") else None
        table.add_row(r["id"], r["name"], _styled(r["status"]), _node(r, r.get("node_id")), _ago(r["created_at"]),
                      _duration(dur), "-" if r.get("exit_code") is None else str(r["exit_code"]),
                      *_spent((r.get("spent") or {}).get(k, 0.0) for k in ("gpu_seconds", "cost")))
    console = _console()
    if not runs:
        console.print("no runs" + (f" with status {', '.join(wanted)}" if wanted else ""))
    else:
        console.print(table)


@run_app.command("status")
def run_status(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN_ID]")] = None,
    rid: RunIdOpt = None,
    run_name: RunNameOpt = None,
    explain: Annotated[bool, typer.Option("--explain", help="Also show how placement scored the nodes it "
                                                            "considered: each scorer's value and weight.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show one run: state, why it waits or failed, node, times, exit code. A sweep's id shows its points."""
    from . import sweeps
    from .api import connect

    api = connect()
    if sweeps.is_sweep(run_id or rid):
        sweeps.show(api.get(f"/sweeps/{run_id or rid}"), as_json=as_json)
        return
    r = api.get(f"/runs/{which_run(api, run_id, rid, run_name)}")
    if as_json:
        _print_json({**r, "fedml_status": fedml_status(r)})
        return
    from rich.console import Console
    from rich.markup import escape

    dur = ((r.get("ended_at") or time.time()) - r["started_at"]) if r.get("started_at") else None
    rows = [("run", r["id"]), ("name", r["name"]), ("status", _styled(r["status"])),
            ("reason", escape(r["reason"]) if r.get("reason") else "-"),
            ("exit code", "-" if r.get("exit_code") is None else str(r["exit_code"])),
            ("node", _node(r, r.get("node_id"))), ("gpus", ",".join(map(str, r.get("gpus") or [])) or "-"),
            ("job type", r["job"].get("job_type", "train")), ("file", r.get("job_file") or "-"),
            ("owner", escape(r["owner"]) + (f" (team {escape(r['team'])})" if r.get("team") else "")),
            ("used", "{} GPU-hours, cost {}".format(*_spent((r.get("spent") or {}).get(k, 0.0)
                                                           for k in ("gpu_seconds", "cost"))).replace("-", "0")),
            ("created", _ago(r["created_at"])), ("duration", _duration(dur)), ("log lines", str(r["log_count"])),
            ("attempt", str(r.get("attempt", 1)))]
    if len(r.get("placements") or []) > 1:
        for p in r["placements"]:
            extra = f" exit {p['exit_code']}" if p.get("exit_code") is not None else ""
            rows.append((f"rank {p['rank']}", f"{_node(r, p['node_id'])} gpus [{','.join(map(str, p['gpus']))}] "
                                             f"{_styled(p['status'])}{extra}"))
    for a in r.get("attempts") or []:  # earlier attempts: where each ran and why it ended
        nodes = ",".join(_node(r, p["node_id"]) for p in a.get("placements") or []) or "-"
        rows.append((f"attempt {a['attempt']}", f"on {nodes}: {escape(a.get('reason') or '-')}"))
    for w in (r.get("warnings") or [])[-5:]:  # its job file's likely typos; a GPU it used without having it
        rows.append(("warning", f"[yellow]{escape(w)}[/yellow]"))
    for d in (r.get("deliveries") or [])[-5:]:  # its webhooks (notify: in the job), the latest
        how = f"HTTP {d['code']}" if d.get("code") else escape(d.get("error") or "-")
        rows.append(("webhook", f"{d['event']} (attempt {d['attempt']}) -> {escape(d['url'])}: "
                                f"[{'green' if d['state'] == 'delivered' else 'red'}]{d['state']}[/] after "
                                f"{d['tries']} tr{'y' if d['tries'] == 1 else 'ies'} ({how})"))
    if r["status"] == "QUEUED":  # its place in line, who is ahead, and about when it starts (GET /queue)
        rows += _standing(api.get("/queue", params={"run": r["id"]}))
    console = Console()
    for k, v in rows:
        console.print(f"[bold]{k:>10}[/bold]  {v}")
    if explain:
        _explain(console, r)


def _standing(q: dict[str, Any]) -> list[tuple[str, str]]:
    from rich.markup import escape

    if q["held"]:
        return [("in line", "not yet: " + escape(q["held"][0]["reason"]))]
    if not q["runs"]:
        return []
    s = q["runs"][0]
    ahead, starts = standing(s, q["now"], owners=5, detail=True)
    return [("in line", f"{s['position']} of {q['total']}"), ("ahead", escape(ahead)), ("starts", escape(starts))]


def _explain(console: Any, r: dict[str, Any]) -> None:
    """Why these nodes: every feasible node placement scored, best first (Nomad's score metadata)."""
    from rich.table import Table

    scored = sorted(r.get("scores") or [], key=lambda s: -s["total"])
    if not scored:
        console.print("\n" + ("Not placed yet: " + (r.get("reason") or "waiting for a pass")
                              if r["status"] == "QUEUED" else "No placement scores recorded for this attempt."))
        return
    weights = scored[0].get("weights") or {}
    names = list(weights) or sorted({k for s in scored for k in s.get("scores", {})})
    console.print("\nplacement: weighted mean of " + ", ".join(f"{n} x{weights.get(n, 1):g}" for n in names),
                  highlight=False)
    table = Table()
    for col in ("node", "rank", "score", *names):
        table.add_column(col, justify="left" if col == "node" else "right")
    for s in scored:
        table.add_row(_node(r, s["node_id"]), "-" if s.get("rank") is None else str(s["rank"]), f"{s['total']:.3f}",
                      *(f"{s.get('scores', {}).get(n, 0):.3f}" for n in names))
    console.print(table)


@run_app.command("stop")
def run_stop(
    run_id: Annotated[str | None, typer.Argument(metavar="[RUN_ID]")] = None,
    rid: RunIdOpt = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the run has ended.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop a run: its whole process tree gets SIGTERM, then SIGKILL after a grace period. A sweep's id stops
    every point of it that has not ended."""
    from . import sweeps
    from .api import connect

    api = connect()
    if sweeps.is_sweep(run_id or rid):
        sid = run_id or rid
        s = api.post(f"/sweeps/{sid}/stop")
        deadline = time.monotonic() + (timeout if wait else 0)
        while s["done"] < s["size"] and time.monotonic() < deadline:
            time.sleep(0.2)
            s = api.get(f"/sweeps/{sid}")
        stop_said({"status": "FINISHED" if s["done"] == s["size"] else "RUNNING"}, waited=wait, as_json=as_json,
                  doc=s, message=f"Sweep {sid}: {sweeps.summary_line(s)}.")
        return
    run_id = which_run(api, run_id, rid)
    r = wait_ended(api, api.post(f"/runs/{run_id}/stop"), timeout if wait else 0)
    stop_said(r, waited=wait, as_json=as_json, doc=r, message=(
        f"Run {run_id} {r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
        if r["status"] in TERMINAL else f"Stop requested for run {run_id} (now {r['status']})."))


@run_app.command("retry")
def run_retry(
    ref: Annotated[str, typer.Argument(metavar="RUN_ID|SWEEP_ID")],
    all_points: Annotated[bool, typer.Option("--all", help="A sweep: every ended point, not only those that "
                                                           "failed, were stopped or lost.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Launch an ended run again (a new run of the same job, workspace and environment), or a sweep's failed
    points (new runs of the same sweep; `fedml run status SWEEP_ID` shows each point's latest run)."""
    from . import sweeps
    from .api import connect

    if not sweeps.is_sweep(ref):
        if all_points:
            raise CliError("--all: only with a sweep's id (sweep-...)", USAGE)
        r = connect().post(f"/runs/{ref}/retry")
        if as_json:
            _print_json(r)
            return
        _err(f"Run {ref} launched again as {r['id']} (`fedml logs -f {r['id']}`).")
        return
    s = connect().post(f"/sweeps/{ref}/retry", params={"all": "true" if all_points else "false"})
    if as_json:
        _print_json(s)
        return
    again = s.get("relaunched") or []
    _err(f"Sweep {ref}: {len(again)} point(s) launched again" + (f" ({', '.join(again)})" if again else
                                                                 " (none had ended badly)") + ".")


@run_app.command("artifacts")
def run_artifacts(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    download: Annotated[str | None, typer.Option("--download", "-o", metavar="DIR",
                                                 help="Unpack them into DIR (one folder per rank for multi-node runs).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Files the run left in $FEDML_ARTIFACT_DIR (checkpoints, metrics), kept by the scheduler."""
    from .api import connect

    api = connect()
    run = api.get(f"/runs/{run_id}")
    latest: dict[int, dict[str, Any]] = {}
    for a in sorted(run.get("artifacts", []), key=lambda a: a["attempt"]):
        latest[a["rank"]] = a
    if download:
        _download_artifacts(api, run, latest, download)
    if as_json:
        _print_json(list(latest.values()))
    elif not latest:
        _err(f"run {run_id} kept no artifacts (a job keeps files by writing them to $FEDML_ARTIFACT_DIR)")
    elif not download:
        for a in latest.values():
            sys.stdout.write(f"rank {a['rank']}: {a['files']} file(s), {a['size']} bytes (attempt {a['attempt']})\n")


def _download_artifacts(api: Any, run: dict[str, Any], latest: dict[int, dict[str, Any]], dest: str) -> None:
    import tempfile

    from scheduler.contract.archive import UnsafeArchive, unpack

    for rank, a in latest.items():
        target = Path(dest) / f"rank{rank}" if run.get("num_nodes", 1) > 1 else Path(dest)
        fd, tmp = tempfile.mkstemp(suffix=".tar.gz")
        try:
            with os.fdopen(fd, "wb") as f:
                api.download(f"/runs/{run['id']}/artifacts/{rank}", f, f"artifacts of rank {rank}",
                             total=a.get("size"))
            unpack(tmp, target)
        except UnsafeArchive as exc:
            raise CliError(f"artifacts of rank {rank} refused: {exc}") from None
        finally:
            os.unlink(tmp)
        _err(f"rank {rank}: {a['files']} file(s) -> {target}")


# ---- metrics -----------------------------------------------------------------------------------------------

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 32) -> str:
    """The last `width` values as block characters, lowest to highest."""
    vals = values[-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi == lo:
        return SPARK[3] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * len(SPARK)))] for v in vals)


def _metrics_table(rows: list[tuple[str, dict[str, Any]]], title: str | None = None) -> Any:
    from rich.table import Table

    table = Table(box=None, header_style="bold", title=title)
    for col in ("METRIC", "RUN", "RANK", "ATTEMPT", "LAST", "MIN", "MAX", "POINTS", ""):
        table.add_column(col, overflow="fold")
    for run_id, s in rows:
        values = [p[1] for p in s["points"]]
        table.add_row(s["name"], run_id, str(s["rank"]), str(s["attempt"]), f"{s['last']:.6g}",
                      f"{min(values):.6g}", f"{max(values):.6g}", str(s["reported"]), sparkline(values))
    return table


def _spent(values: Any) -> tuple[str, str]:
    """FedML's "Spend Time" and "Cost" columns: GPU-hours and cost ("-" for none)."""
    gpu_s, cost = values
    return (f"{gpu_s / 3600:.2f}" if gpu_s else "-", f"{cost:.2f}" if cost else "-")


@run_app.command("metrics")
def run_metrics(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    name: Annotated[list[str] | None, typer.Option("--name", "-n", help="Only this metric (repeat for more).")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Redraw every 2 s until the run ends.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The metrics the run's job reported (`fedml.log({...}, step=i)` in Python, or a line
    `FEDML_METRIC {"loss": 0.3}` printed from any language): latest, min, max and a sparkline per metric, rank
    and attempt. --json gives every point ([step, value, time], at most 1,000 a series)."""
    from .api import connect

    api = connect()
    params = {"name": name} if name else None

    def read() -> dict[str, Any]:
        return api.get(f"/runs/{run_id}/metrics", params=params)

    got = read()
    if as_json:
        _print_json(got)
        return
    from rich.console import Group as RichGroup
    from rich.text import Text

    def render(m: dict[str, Any]) -> Any:
        parts: list[Any] = []
        if m["series"]:
            parts.append(_metrics_table([(m["run_id"], s) for s in m["series"]]))
        else:
            parts.append(Text("no metrics yet: a job reports them with fedml.log({...}) or by printing "
                              'FEDML_METRIC {"name": value}', style="dim"))
        if m["ignored"]:
            parts.append(Text(f"{m['ignored']} metric line(s) ignored; the latest: {m['ignored_why']}", style="yellow"))
        if not m["complete"]:
            parts.append(Text("(the log is long: read in part; run this again to read on)", style="dim"))
        return RichGroup(*parts)

    console = _console()
    if not watch or got["status"] in TERMINAL:
        console.print(render(got))
        return
    from rich.live import Live

    with Live(render(got), console=console, refresh_per_second=2) as live:
        while got["status"] not in TERMINAL:
            time.sleep(2)
            got = read()
            live.update(render(got))


@run_app.command("compare")
def run_compare(
    run_ids: Annotated[list[str], typer.Argument(metavar="RUN_ID...", help="Two or more runs (a sweep's points).")],
    name: Annotated[list[str] | None, typer.Option("--name", "-n", help="Only this metric (repeat for more).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """One metric across runs, side by side: latest, min, max and a sparkline of each run's rank 0, latest
    attempt (the others with --json)."""
    from .api import connect

    if len(run_ids) < 2:
        raise CliError("compare takes two or more runs", USAGE)
    api = connect()
    params = {"name": name} if name else None
    got = [api.get(f"/runs/{r}/metrics", params=params) for r in run_ids]
    if as_json:
        _print_json({"runs": got})
        return
    by_name: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for m in got:
        latest: dict[str, dict[str, Any]] = {}
        for s in m["series"]:
            if s["rank"] == 0 and (s["name"] not in latest or s["attempt"] > latest[s["name"]]["attempt"]):
                latest[s["name"]] = s
        for metric, s in latest.items():
            by_name.setdefault(metric, []).append((m["run_id"], s))
    console = _console()
    if not by_name:
        console.print("none of these runs reported metrics" + (f" named {', '.join(name)}" if name else ""))
        return
    for metric in sorted(by_name):
        console.print(_metrics_table(by_name[metric], title=metric))
