"""`fedml`: the command line. Heavy modules (httpx, pydantic, rich tables) are imported inside commands so
that `fedml --help` and `fedml version` stay fast; FastAPI, uvicorn, docker, kubernetes and torch are never
imported here."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated, Any

import typer

from . import __version__, cluster, endpoint
from .errors import FAILED, INTERRUPTED, NOT_FOUND, OK, USAGE, CliError
from .output import Group, JsonOpt
from .output import err as _err
from .output import print_json as _print_json

app = typer.Typer(
    name="fedml",
    cls=Group,  # a CliError from any command: one line on stderr, its exit code
    help="fedml launch: run AI jobs on your own machines. `fedml launch job.yaml` runs a FedML job YAML and "
         "streams its logs; a local scheduler starts on first use.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: rendering help with rich costs ~100 ms per call
    context_settings={"help_option_names": ["-h", "--help"]},
)
run_app = typer.Typer(help="Inspect and stop runs.", no_args_is_help=True, rich_markup_mode=None)
scheduler_app = typer.Typer(help="Run or stop the scheduler.", no_args_is_help=True, rich_markup_mode=None)
template_app = typer.Typer(help="Prebuilt jobs to copy and edit: hello, train, train_ddp ...", no_args_is_help=True,
                           rich_markup_mode=None)
app.add_typer(run_app, name="run")
app.add_typer(scheduler_app, name="scheduler")
app.add_typer(template_app, name="template")
app.command("login")(cluster.login)
app.command("logout")(cluster.logout)
app.add_typer(cluster.node_app, name="node")
app.add_typer(endpoint.endpoint_app, name="endpoint")
scheduler_app.add_typer(cluster.key_app, name="key")
scheduler_app.add_typer(cluster.token_app, name="token")

TERMINAL = ("FINISHED", "FAILED", "KILLED")
STATUSES = ("QUEUED", "STARTING", "RUNNING", "FINISHED", "FAILED", "KILLED", "LOST")


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


# ---- launch ------------------------------------------------------------------------------------------------

@app.command()
def launch(
    job_file: Annotated[str, typer.Argument(metavar="JOB.yaml", help="FedML job YAML.")],
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Submit, print the run id, do not follow.")] = False,
    as_json: JsonOpt = False,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", metavar="K=V",
                                                  help="Extra environment variable for the job; repeatable.")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Run name (default: job_name or file name).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the resolved job; submit nothing.")] = False,
    stop_on_interrupt: Annotated[bool, typer.Option("--stop-on-interrupt",
                                                    help="Ctrl-C stops the run too (default: it keeps running).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Unknown keys that look like typos (`computing: "
                                                          "{minimum_num_gpu: 1}`) are errors, not warnings.")] = False,
) -> None:
    """Validate JOB.yaml, upload its workspace, start a run and follow its logs.

    Exits with the job's exit code (0 when it finished). Ctrl-C stops following; the run goes on.
    """
    from scheduler.contract.jobspec import JobSpecError, env_problem, load_file

    try:
        loaded = load_file(job_file)
    except JobSpecError as exc:
        _err(f"error: {exc}")
        raise typer.Exit(USAGE) from None
    for w in loaded.warnings:
        _err(f"{'error' if strict else 'warning'}: {w}")
    if strict and loaded.warnings:
        raise typer.Exit(USAGE)
    overrides: dict[str, str] = {}
    for item in env or []:
        key, sep, val = item.partition("=")
        if not sep:
            _err(f'error: --env: expected NAME=VALUE, got "{item[:80]}"')
            raise typer.Exit(USAGE)
        if (why := env_problem(key, val)) is not None:
            _err(f"error: --env: {why}")
            raise typer.Exit(USAGE)
        overrides[key] = val
    spec = loaded.spec
    job_doc = spec.model_dump(mode="json", exclude_none=True)
    if dry_run:
        _show_dry_run(job_file, loaded, job_doc, overrides, name, as_json)
        return
    if not spec.commands().strip():
        _err(f"error: {job_file}: job: this file refers to a job stored on FedML's platform (job_args); "
             "put the commands to run in `job`")
        raise typer.Exit(USAGE)
    from .api import connect

    api = connect()
    sha = None
    if loaded.workspace_dir is not None:
        from .pack import pack

        packed = pack(loaded.workspace_dir, show_progress=not as_json)
        try:
            sha = packed.sha256
            if not api.has_blob(sha):
                api.put_blob(sha, packed.path, show_progress=not as_json)
        finally:
            os.unlink(packed.path)
    run = api.post("/runs", json={"job": job_doc, "name": name, "job_file": os.path.basename(job_file),
                                  "workspace_sha": sha, "env": overrides})
    if detach:
        if as_json:
            _print_json(run)
        else:
            sys.stdout.write(run["id"] + "\n")
            _err(f"Run {run['id']} submitted ({run['status']}). Follow it with `fedml logs -f {run['id']}`.")
        return
    if not as_json:
        _err(f"Run {run['id']} submitted; following its logs (Ctrl-C stops following, not the run).")
    watch = _QueueWatch(api, run) if not as_json and run.get("status") == "QUEUED" else None
    try:
        code = _follow(api, run["id"], as_json=as_json, stop_on_interrupt=stop_on_interrupt,
                       ranked=run.get("num_nodes", 1) > 1, on_first=watch.stop if watch else None)
    finally:
        if watch is not None:
            watch.stop()
    raise typer.Exit(code)


def _show_dry_run(job_file: str, loaded: Any, job_doc: dict[str, Any], overrides: dict[str, str],
                  name: str | None, as_json: bool) -> None:
    ws = loaded.workspace_dir
    resolved = {"file": str(loaded.path), "name": name or loaded.spec.job_name or loaded.path.stem,
                "workspace_dir": str(ws) if ws else None, "job": job_doc, "env": overrides,
                "exported_env": loaded.spec.fedml_env_vars()}
    if as_json:
        _print_json(resolved)
        return
    import yaml

    sys.stdout.write(f"# {job_file}: valid (dry run, nothing submitted)\n")
    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False))


def _line(rec: dict[str, Any], ranked: bool) -> str:
    if rec.get("stream") == "fedml":  # the scheduler's own lines (attempt markers): never a rank's
        return rec["line"] + "\n"
    return f"[rank {rec['rank']}] {rec['line']}\n" if ranked else rec["line"] + "\n"


def _interrupted(api: Any, run_id: str, stop_on_interrupt: bool) -> int:
    if stop_on_interrupt:
        try:
            api.post(f"/runs/{run_id}/stop")
            _err(f"\nInterrupted: stop requested for run {run_id}.")
        except CliError as exc:
            _err(f"\nInterrupted; could not stop run {run_id}: {exc}")
    else:
        _err(f"\nStopped following. Run {run_id} keeps running: `fedml logs -f {run_id}` to follow it again, "
             f"`fedml run stop {run_id}` to stop it.")
    return INTERRUPTED


class _QueueWatch:
    """While a launched run waits to be placed, say why: a spinner with the reason on a terminal, a line per new
    reason otherwise (stderr), once it has waited a second. It runs beside the log follower, which starts at once,
    so a run placed at once costs nothing; it ends when the run leaves the queue or the first log line arrives."""

    def __init__(self, api: Any, run: dict[str, Any]) -> None:
        import threading

        from .api import Api

        self.api = Api(api.url, api.token)  # its own connection: the follower streams on the other
        self.run_id, self.reason = run["id"], None
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.spinner: Any = None
        self.thread = threading.Thread(target=self._watch, args=(run,), name="queue-watch", daemon=True)
        self.thread.start()

    def _watch(self, run: dict[str, Any]) -> None:
        try:
            # Quiet for a second: most runs are placed by then, and a scheduler that has just started would
            # otherwise say "no nodes have joined yet" while its own local agent is still joining.
            if self.done.wait(1.0):
                return
            run = self.api.get(f"/runs/{self.run_id}")
            while run.get("status") == "QUEUED" and not self.done.is_set():
                if run.get("reason") and run["reason"] != self.reason:
                    self._say(f"queued: {run['reason']}")
                    self.reason = run["reason"]
                if self.done.wait(0.5):
                    break
                run = self.api.get(f"/runs/{self.run_id}")
        except CliError:
            pass  # the follower reports a lost scheduler
        finally:
            self.stop()

    def _say(self, text: str) -> None:
        with self.lock:
            if self.done.is_set():
                return
            if not sys.stderr.isatty():
                _err(text)
                return
            from rich.markup import escape

            if self.spinner is None:
                from rich.console import Console

                self.spinner = Console(stderr=True).status(escape(text), spinner="dots")
                self.spinner.start()
            else:
                self.spinner.update(escape(text))

    def stop(self) -> None:
        with self.lock:
            self.done.set()
            if self.spinner is not None:
                self.spinner.stop()
                self.spinner = None


def _follow(api: Any, run_id: str, *, as_json: bool = False, stop_on_interrupt: bool = False,
            after: int = -1, tail: int | None = None, rank: int | None = None, ranked: bool = False,
            on_first: Any = None) -> int:
    """Print the run's log until it ends; reconnect if the scheduler restarts. Returns the exit code."""
    out, err = sys.stdout, sys.stderr
    end: dict[str, Any] | None = None
    delay = 0.2
    try:
        while end is None:
            try:
                for rec in api.stream_logs(run_id, after=after, tail=tail, follow=True, rank=rank):
                    if rec.get("end"):
                        end = rec
                        break
                    after = rec["pos"]
                    if on_first is not None:  # a line: the run left the queue (stop the spinner before printing)
                        on_first()
                        on_first = None
                    if as_json:
                        out.write(json.dumps(rec) + "\n")
                    else:
                        (err if rec.get("stream") in ("stderr", "fedml") else out).write(_line(rec, ranked))
                    delay = 0.2
                tail = None
            except CliError as exc:
                if exc.code in (NOT_FOUND, USAGE):
                    raise
                out.flush()
                _err(f"(connection to the scheduler lost: {exc}; retrying)")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                if api.embedded:
                    from .api import connect

                    api = connect()
            out.flush()
    except KeyboardInterrupt:
        out.flush()
        return _interrupted(api, run_id, stop_on_interrupt)
    out.flush()
    run = {"status": end["status"], "exit_code": end.get("exit_code")}
    code = _run_exit_code(run)
    if as_json:
        out.write(json.dumps({"end": True, "run_id": run_id, **{k: end.get(k) for k in
                                                                ("status", "exit_code", "reason")}}) + "\n")
    elif end["status"] != "FINISHED":
        why = f": {end['reason']}" if end.get("reason") else ""
        _err(f"Run {run_id} {end['status']}{why}")
    return code


# ---- logs --------------------------------------------------------------------------------------------------

@app.command()
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
    for rec in api.stream_logs(run_id, tail=tail, rank=rank):
        if rec.get("end"):
            break
        if as_json:
            sys.stdout.write(json.dumps(rec) + "\n")
        else:
            (sys.stderr if rec.get("stream") in ("stderr", "fedml") else sys.stdout).write(_line(rec, ranked))


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
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    wanted = _status_arg(status)
    from .api import connect

    runs = connect().get("/runs", params={"status": wanted, "limit": limit})
    if as_json:
        _print_json(runs)
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("RUN", "NAME", "STATUS", "NODE", "CREATED", "DURATION", "EXIT"):
        table.add_column(col)
    for r in runs:
        dur = ((r.get("ended_at") or time.time()) - r["started_at"]) if r.get("started_at") else None
        table.add_row(r["id"], r["name"], _styled(r["status"]), _node(r, r.get("node_id")), _ago(r["created_at"]),
                      _duration(dur), "-" if r.get("exit_code") is None else str(r["exit_code"]))
    console = _console()
    if not runs:
        console.print("no runs" + (f" with status {', '.join(wanted)}" if wanted else ""))
    else:
        console.print(table)


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
             "STARTING": "cyan", "QUEUED": "blue"}.get(status, "white")
    return f"[{color}]{status}[/{color}]"


@run_app.command("status")
def run_status(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    explain: Annotated[bool, typer.Option("--explain", help="Also show how placement scored the nodes it "
                                                            "considered: each scorer's value and weight.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show one run: state, why it waits or failed, node, times, exit code."""
    from .api import connect

    r = connect().get(f"/runs/{run_id}")
    if as_json:
        _print_json(r)
        return
    from rich.console import Console
    from rich.markup import escape

    dur = ((r.get("ended_at") or time.time()) - r["started_at"]) if r.get("started_at") else None
    rows = [("run", r["id"]), ("name", r["name"]), ("status", _styled(r["status"])),
            ("reason", escape(r["reason"]) if r.get("reason") else "-"),
            ("exit code", "-" if r.get("exit_code") is None else str(r["exit_code"])),
            ("node", _node(r, r.get("node_id"))), ("gpus", ",".join(map(str, r.get("gpus") or [])) or "-"),
            ("job type", r["job"].get("job_type", "train")), ("file", r.get("job_file") or "-"),
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
    console = Console()
    for k, v in rows:
        console.print(f"[bold]{k:>10}[/bold]  {v}")
    if explain:
        _explain(console, r)


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
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until the run has ended.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait with --wait.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop a run: its whole process tree gets SIGTERM, then SIGKILL after a grace period."""
    from .api import connect

    api = connect()
    r = api.post(f"/runs/{run_id}/stop")
    deadline = time.monotonic() + timeout
    while wait and r["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.1)
        r = api.get(f"/runs/{run_id}")
    if as_json:
        _print_json(r)
    elif r["status"] in TERMINAL:
        _err(f"Run {run_id} {r['status']}" + (f" ({r['reason']})" if r.get("reason") else ""))
    else:
        _err(f"Stop requested for run {run_id} (now {r['status']}).")
    if wait and r["status"] not in TERMINAL:
        raise typer.Exit(FAILED)


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
    from pathlib import Path

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


# ---- templates ---------------------------------------------------------------------------------------------

def _templates_dir() -> Any:
    from pathlib import Path

    here = Path(__file__).resolve().parent
    for d in (here / "job_templates", here.parent / "job_templates"):  # installed wheel, source checkout
        if d.is_dir():
            return d
    raise CliError("job templates are not installed with this copy of fedml")


def _template(name: str) -> Any:
    d = _templates_dir() / name
    if not (d / "job.yaml").is_file():
        names = ", ".join(sorted(p.name for p in _templates_dir().iterdir() if (p / "job.yaml").is_file()))
        raise CliError(f'no template "{name}"; templates: {names}', USAGE)
    return d


def _describe_template(d: Any) -> str:
    first = d.joinpath("job.yaml").read_text().splitlines()[0] if d.joinpath("job.yaml").exists() else ""
    return first.lstrip("# ").strip() if first.startswith("#") else ""


@template_app.command("list")
def template_list(as_json: JsonOpt = False) -> None:
    """The prebuilt jobs."""
    d = _templates_dir()
    items = [{"name": p.name, "description": _describe_template(p)}
             for p in sorted(d.iterdir()) if (p / "job.yaml").is_file()]
    if as_json:
        _print_json(items)
        return
    for it in items:
        sys.stdout.write(f"{it['name']:<12} {it['description']}\n")


@template_app.command("show")
def template_show(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Print a template's job.yaml and list its files."""
    d = _template(name)
    sys.stdout.write(d.joinpath("job.yaml").read_text())
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    sys.stdout.write("\n# files: " + ", ".join(files) + "\n")


@template_app.command("init")
def template_init(name: Annotated[str, typer.Argument(metavar="NAME")],
                  dest: Annotated[str | None, typer.Argument(metavar="DIR", help="Where (default: ./NAME).")] = None) -> None:
    """Copy a template into DIR to edit it; then `fedml launch DIR/job.yaml`."""
    import shutil
    from pathlib import Path

    d = _template(name)
    target = Path(dest or name)
    if target.exists() and any(target.iterdir()):
        _err(f"error: {target} exists and is not empty; pick another DIR")
        raise typer.Exit(USAGE)
    from .progress import Progress

    total = sum(1 for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")

    def copy(src: str, dst: str) -> object:
        bar.advance(1)
        return shutil.copy2(src, dst)

    try:
        with Progress(f"copying template {name}", total, unit="files") as bar:
            shutil.copytree(d, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            copy_function=copy)
    except OSError as exc:
        _err(f"error: cannot create {target}: {exc.strerror or exc}")
        raise typer.Exit(USAGE) from None
    _err(f"Created {target} from template {name}. Run it with: fedml launch {target / 'job.yaml'}")


# ---- scheduler ---------------------------------------------------------------------------------------------

@scheduler_app.command("start")
def scheduler_start(
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for a team).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: any free port).")] = 8787,
    agent: Annotated[bool | None, typer.Option("--agent/--no-agent", help="Also run a local agent on this machine "
                                                                        "(default: only with a loopback --host).")] = None,
    run_as: Annotated[str, typer.Option("--run-as", help="User the local agent runs jobs as: auto (fedml-job "
                                                         "when root), self, or a user name.")] = "auto",
    max_workspace_mb: Annotated[int, typer.Option(help="Largest workspace upload accepted.")] = 512,
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between agent heartbeats; a node silent for "
                                                           "3 intervals is offline.")] = 10.0,
    store: Annotated[str, typer.Option(help="sqlite (a database in FEDML_HOME) or redis://HOST:6379/0[?prefix=P]: "
                                            "several schedulers may share one Redis, with one shared --blob-dir.")]
    = "sqlite",
    blob_dir: Annotated[str | None, typer.Option(help="Where uploaded workspaces and artifacts live "
                                                      "(default: in FEDML_HOME).")] = None,
    log_retention_lines: Annotated[int | None, typer.Option(min=1, help="Log lines kept per run "
                                                                        "(the newest; default 1,000,000).")] = None,
    gpus: Annotated[str | None, typer.Option(help="GPUs the local agent declares when NVML sees none, "
                                                  "e.g. A100-80G:2.")] = None,
) -> None:
    """Run a scheduler in the foreground (Ctrl-C stops it). State lives in the user data dir (FEDML_HOME).

    On first start it prints an admin API key (stored hashed; also saved to FEDML_HOME/local/token).
    """
    from . import local

    try:
        local.running()
        _err("error: a local scheduler is already running for this FEDML_HOME; `fedml scheduler stop` first")
        raise typer.Exit(USAGE)
    except CliError:
        pass
    args = ["--host", host, "--port", str(port), "--max-workspace-mb", str(max_workspace_mb),
            "--heartbeat-interval", str(heartbeat_interval), "--run-as", run_as, "--store", store]
    for flag, value in (("--blob-dir", blob_dir), ("--log-retention-lines", log_retention_lines), ("--gpus", gpus)):
        if value is not None:
            args += [flag, str(value)]
    if agent is not None:
        args.append("--agent" if agent else "--no-agent")
    # The CLI starts the server, it does not import it: this process becomes `python -m scheduler.server`.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "scheduler.server", *args])


@scheduler_app.command("stop")
def scheduler_stop() -> None:
    """Stop the local scheduler and its agent. Running jobs keep running and are picked up again on restart."""
    from . import local

    stopped = local.stop()
    if not stopped:
        _err("no local scheduler is running")
        return
    for what in stopped:
        _err(f"stopped {what}")


@scheduler_app.command("status")
def scheduler_status(as_json: JsonOpt = False) -> None:
    """The scheduler commands go to (FEDML_SERVER, else the one `fedml login` chose, else the local one): is it
    up, where, and what does it hold."""
    from .api import connect, target

    where = target()
    try:
        if where["kind"] == "local":
            from . import local

            where["url"], _ = local.running()
        info = connect(start=False).get("/info")
    except CliError as exc:
        if as_json:
            _print_json({"running": False, **where, "error": str(exc)})
        else:
            _err(f"{where['kind']} scheduler{' ' + where['url'] if where['url'] else ''}: {exc}")
        raise typer.Exit(exc.code) from None
    if as_json:
        _print_json({"running": True, **where, **info})
    else:
        sys.stdout.write(f"{where['kind']} scheduler running at {where['url']}: {info['nodes']} node(s), {info['gpus']} GPU(s), "
                         f"store {info['store']}\n")


# ---- version, env ------------------------------------------------------------------------------------------

@app.command()
def version(as_json: JsonOpt = False) -> None:
    """Print the version."""
    if as_json:
        _print_json({"version": __version__})
    else:
        sys.stdout.write(f"fedml launch {__version__}\n")


@app.command("env")
def env_cmd(as_json: JsonOpt = False) -> None:
    """Versions, where state lives, which scheduler the CLI talks to, and the GPUs this machine has."""
    import platform
    import subprocess

    from scheduler.contract import paths

    from . import local
    from .api import target

    sched = target()
    if sched["kind"] == "local":
        try:
            sched["url"], _ = local.running()
            sched["running"] = True
        except CliError:
            sched["running"] = False
    try:  # NVML is the agent's business: ask it across a process boundary (as a node would report it)
        out = subprocess.run([sys.executable, "-m", "agents.inventory"], capture_output=True, text=True, timeout=60)
        seen = json.loads(out.stdout)
        gpus, why = seen["gpus"], seen["why"]
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        gpus, why = [], f"could not ask NVML ({exc})"
    root = os.getuid() == 0
    tenancy = ("shared: a node joined from here runs jobs as fedml-job (`--run-as`), apart from the agent's keys"
               if root else "single-tenant: a node joined from here runs jobs as you, so only your own runs "
                            "(an agent run as root can isolate jobs and take everyone's)")
    info = {"fedml_launch": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "home": str(paths.home()), "scheduler": sched, "node_tenancy": tenancy,
            "gpus": gpus, "gpus_note": why}
    if as_json:
        _print_json(info)
        return
    w = sys.stdout.write
    w(f"fedml launch  {__version__}\npython        {info['python']}\nplatform      {info['platform']}\n")
    w(f"home          {info['home']}\n")
    if sched["kind"] != "local":
        w(f"scheduler     {sched['url']} ({sched['kind']})\n")
    else:
        w(f"scheduler     {sched['url'] or 'local, not running (started by the first command that needs it)'}\n")
    w(f"node          {tenancy}\n")
    if gpus:
        for g in gpus:
            w(f"gpu {g['index']}         {g['name']}, {g['memory_mb']} MiB\n")
    else:
        w(f"gpus          none seen ({why})\n")


def main() -> None:
    if sys.argv[1:2] == ["login"]:
        cluster.reexec_without_key(sys.argv[1:])
    try:
        app()
    except CliError as exc:
        _err(f"error: {exc}")
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
