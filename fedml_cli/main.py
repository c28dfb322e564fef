"""`fedml`: the command line. Heavy modules (httpx, pydantic, rich tables) are imported inside commands so
that `fedml --help` and `fedml version` stay fast; FastAPI, uvicorn, docker, kubernetes and torch are never
imported here."""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Annotated, Any

import typer

from . import (
    __version__,
    admin,
    cluster,
    clusters_cmd,
    endpoint,
    model_cmd,
    runs,
    scheduler_cmd,
    storage_cmd,
    teams_cmd,
    templates,
)
from .errors import USAGE, CliError
from .follow import _follow, _QueueWatch
from .output import Group, JsonOpt, fail
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
def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"fedml launch {__version__}\n")
        raise typer.Exit()


@app.callback()
def _top(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                               help="Print the version and exit (as `fedml version`).")] = False,
         ) -> None:
    pass  # (the group's own options; its help is the app's)


app.add_typer(runs.run_app, name="run")
app.add_typer(runs.run_app, name="job", help="FedML's older name for `fedml run` (`fedml job logs -jid ID`).",
              hidden=True)
app.add_typer(scheduler_cmd.scheduler_app, name="scheduler")
app.add_typer(templates.template_app, name="template")
app.command("login")(cluster.login)
app.command("logout")(cluster.logout)
device_app = typer.Typer(help="FedML's names: `fedml device bind KEY` is `fedml login KEY`, `unbind` is `logout`.",
                         no_args_is_help=True, rich_markup_mode=None)
device_app.command("bind", help="The same as `fedml login` (FedML's `fedml device bind`).")(cluster.login)
device_app.command("unbind", help="The same as `fedml logout` (FedML's `fedml device unbind`).")(cluster.logout)
app.add_typer(device_app, name="device")
app.add_typer(admin.node_app, name="node")
app.add_typer(endpoint.endpoint_app, name="endpoint")
app.add_typer(model_cmd.model_app, name="model")
app.add_typer(clusters_cmd.cluster_app, name="cluster")
app.add_typer(storage_cmd.storage_app, name="storage")
app.add_typer(teams_cmd.team_app, name="team")
app.command("usage")(teams_cmd.usage)
scheduler_cmd.scheduler_app.add_typer(admin.key_app, name="key")
scheduler_cmd.scheduler_app.add_typer(admin.token_app, name="token")


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
    after: Annotated[list[str] | None, typer.Option("--after", metavar="RUN[:ok|:any]",
                                                    help="Start once RUN has ended; with :ok (the default) only if "
                                                         "it finished, else this run fails; repeatable.")] = None,
    api_key: Annotated[str | None, typer.Option("--api_key", "--api-key", "-k", metavar="KEY",
                                                help="The API key for this command (as FEDML_API_KEY; FedML's "
                                                     "scripts pass -k). Not needed for the local scheduler.")] = None,
    sweep: Annotated[list[str] | None, typer.Option("--sweep", metavar="NAME=V1,V2",
                                                    help="Run the job once per point of a grid: one run per "
                                                         "combination of the values, each with FEDML_SWEEP_NAME "
                                                         "set; repeatable; over the job's `sweep:`.")] = None,
    max_parallel: Annotated[int | None, typer.Option("--max-parallel", min=1, max=1000,
                                                     help="A sweep's most points queued or running at once.")]
    = None,
    cluster_name: Annotated[str | None, typer.Option("--cluster", "-c", metavar="CLUSTER",
                                                     help="Run only on this cluster's nodes (`fedml cluster list`)."
                                                     )] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", metavar="GROUP",
                                              help="FedML's node group: only nodes joined with --label "
                                                   "group=GROUP.")] = None,
) -> None:
    """Validate JOB.yaml, upload its workspace, start a run and follow its logs.

    Exits with the job's exit code (0 when it finished). Ctrl-C stops following; the run goes on. A sweep
    (`--sweep`, `sweep:`) is followed as a whole: exit 0 when every point finished.
    """
    from scheduler.contract.jobyaml import env_problem

    from . import sweeps

    try:
        grid = sweeps.parse(sweep)
    except CliError as exc:
        raise fail(exc) from None
    extra = {"sweep": grid or None, "max_parallel": max_parallel, "cluster": cluster_name}
    if group is not None:
        extra["labels"] = {"group": group}

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
    if api_key is not None:
        os.environ["FEDML_API_KEY"] = api_key
    from .submit import load, submit, submit_loaded

    if not dry_run and not strict:
        try:
            api, run = submit(job_file, name=name, env=overrides, show_progress=not as_json,
                              warn=lambda w: _err(f"warning: {w}"), after=after, **extra)
        except CliError as exc:
            raise fail(exc) from None
        _launched(api, run, detach=detach, as_json=as_json, stop_on_interrupt=stop_on_interrupt)
        return
    try:
        loaded = load(job_file)
    except CliError as exc:
        raise fail(exc) from None
    for w in loaded.warnings:
        _err(f"{'error' if strict else 'warning'}: {w}")
    if strict and loaded.warnings:
        raise typer.Exit(USAGE)
    if dry_run:
        _show_dry_run(job_file, loaded, loaded.spec.model_dump(mode="json", exclude_none=True), overrides, name,
                      as_json, grid, max_parallel)
        return
    try:
        api, run = submit_loaded(job_file, loaded, name=name, env=overrides, show_progress=not as_json, after=after,
                                 **extra)
    except CliError as exc:
        raise fail(exc) from None
    _launched(api, run, detach=detach, as_json=as_json, stop_on_interrupt=stop_on_interrupt)


def _launched(api: Any, run: dict[str, Any], *, detach: bool, as_json: bool, stop_on_interrupt: bool) -> None:
    if run.get("sweep"):
        _launched_sweep(api, run["sweep"], detach=detach, as_json=as_json, stop_on_interrupt=stop_on_interrupt)
        return
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


def _launched_sweep(api: Any, sweep: dict[str, Any], *, detach: bool, as_json: bool, stop_on_interrupt: bool) -> None:
    from . import sweeps

    sid = sweep["id"]
    if detach:
        if as_json:
            _print_json(api.get(f"/sweeps/{sid}"))
        else:
            sys.stdout.write(sid + "\n")
            _err(f"Sweep {sid} submitted: {sweep['size']} runs. `fedml run status {sid}` shows them.")
        return
    if not as_json:
        mp = f", at most {sweep['max_parallel']} at once" if sweep.get("max_parallel") else ""
        _err(f"Sweep {sid} submitted: {sweep['size']} runs{mp}; waiting for them (Ctrl-C stops waiting, not the "
             f"sweep; `fedml logs RUN` shows one).")
    raise typer.Exit(sweeps.watch(api, sid, as_json=as_json, stop_on_interrupt=stop_on_interrupt))


app.command("logs")(runs.logs)


def _show_dry_run(job_file: str, loaded: Any, job_doc: dict[str, Any], overrides: dict[str, str],
                  name: str | None, as_json: bool, grid: dict[str, list[Any]], max_parallel: int | None) -> None:
    ws = loaded.workspace_dir
    resolved = {"file": str(loaded.path), "name": name or loaded.spec.job_name or loaded.path.stem,
                "workspace_dir": str(ws) if ws else None, "job": job_doc, "env": overrides,
                "exported_env": loaded.spec.fedml_env_vars()}
    if grid or loaded.spec.sweep:
        from scheduler.contract.jobspec import sweep_points

        try:
            resolved["sweep_points"] = sweep_points({**(loaded.spec.sweep or {}), **grid})
        except ValueError as exc:
            raise fail(CliError(f"--sweep: {exc}", USAGE)) from None
        resolved["max_parallel"] = max_parallel or loaded.spec.max_parallel
    elif max_parallel is not None:
        raise fail(CliError("--max-parallel: only with a sweep (--sweep, or sweep: in the job)", USAGE))
    if as_json:
        _print_json(resolved)
        return
    import yaml

    sys.stdout.write(f"# {job_file}: valid (dry run, nothing submitted)\n")
    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False))


# ---- version, env ------------------------------------------------------------------------------------------

@app.command()
def dashboard(
    open_browser: Annotated[bool | None, typer.Option("--open/--no-open", help="Open it in a browser (default: "
                                                                              "only where there is a display).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print (and open) the web dashboard's address with a one-time sign-in link for your key (it lasts 5
    minutes and works once); the dashboard is served by the scheduler itself."""
    from .api import connect

    api = connect()
    got = api.post("/ui/link")
    url = f"{api.url}/#/signin/{got['code']}"
    if as_json:
        _print_json({"url": api.url + "/", "sign_in": url, "expires_in": got["expires_in"]})
        return
    sys.stdout.write(url + "\n")
    _err(f"The dashboard: {api.url}/ (the address above signs you in once, within {got['expires_in'] / 60:.0f} min).")
    if open_browser if open_browser is not None else bool(os.environ.get("DISPLAY") or sys.platform == "darwin"):
        import webbrowser

        webbrowser.open(url)


notify_app = typer.Typer(help="Webhooks of your runs (`notify:` in a job: docs/notify.md).", no_args_is_help=True)
app.add_typer(notify_app, name="notify")


@notify_app.command("secret")
def notify_secret(
    owner: Annotated[str | None, typer.Option("--owner", help="Another owner's (admin only).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print the secret your runs' webhooks are signed with: a receiver checks that the X-Fedml-Signature header
    is "sha256=" followed by the hex HMAC-SHA256 of the request body, keyed by this secret."""
    from .api import connect

    got = connect().get("/webhooks/secret", params={"owner": owner} if owner else None)
    if as_json:
        _print_json(got)
        return
    sys.stdout.write(got["secret"] + "\n")
    _err(f"Webhooks of {got['owner']}'s runs are signed with the secret above ({got['header']}: {got['signature']}).")


@app.command()
def queue(
    mine: Annotated[bool, typer.Option("--mine", help="An admin's own runs only (a user sees only theirs).")] = False,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000, help="Show at most this many.")] = 100,
    team: Annotated[str | None, typer.Option("--team", help="Only this team's runs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pending runs in the order the scheduler considers them: each one's place, why it waits (no room, or its
    team's quota), who is ahead of it on the GPUs it could use, and about when it starts (from the running jobs'
    max_duration or how long their names ran before; it says when there is no basis for an estimate)."""
    from .api import connect

    q = connect().get("/queue", params={"limit": limit, "mine": "true" if mine else "false",
                                        **({"team": team} if team else {})})
    if as_json:
        _print_json(q)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .show import _duration, standing

    console = Console() if sys.stdout.isatty() else Console(width=250)  # piped: keep ids whole
    if not q["runs"] and not q["held"]:
        console.print("nothing waits: every run has a place")
        return
    table = Table(box=None, header_style="bold")
    for col in ("#", "RUN", "NAME", "OWNER", "PRI", "GPUS", "WAITING", "WHY", "AHEAD OF IT", "STARTS"):
        table.add_column(col, overflow="fold")
    for r in q["runs"]:
        ahead, starts = standing(r, q["now"])
        gpus = f"{r['gpus'] * r['nodes']}" + (f" {r['gpu_type']}" if r["gpu_type"] else "")
        owner = r["owner"] + (f" ({r['team']})" if r.get("team") else "")
        table.add_row(str(r["position"]), r["id"], r["name"] or "-", escape(owner), str(r["priority"]), gpus,
                      _duration(q["now"] - r["created_at"]) if r["created_at"] else "-", escape(r["reason"]),
                      escape(ahead), escape(starts))
    if q["runs"]:
        console.print(table)
    if q["total"] > q["shown"]:
        _err(f"({q['shown']} of {q['total']} in line shown: --limit shows more)")
    if q["held"]:
        console.print("\n[bold]Not in line yet[/bold]")
        for r in q["held"]:
            console.print(f"  {r['id']}  {escape(r['owner'])}  {escape(r['reason'])}")


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


def _launch_key_out_of_argv(argv: list[str]) -> None:
    """`fedml launch -k KEY ...` (FedML's scripts pass it): the key would stay readable by every user in
    /proc/PID/cmdline (`ps`) for as long as the launch follows its logs. It moves into the environment (readable
    by its owner only) and we exec ourselves again without it. Returns if there is no -k."""
    out: list[str] = []
    key = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a in ("-k", "--api_key", "--api-key") and i + 1 < len(argv):
            key, i = argv[i + 1], i + 2
            continue
        if a.startswith(("--api_key=", "--api-key=")) or (a.startswith("-k") and len(a) > 2 and not a.startswith("--")):
            key, i = a.split("=", 1)[1] if a.startswith("--") else a[2:], i + 1
            continue
        out.append(a)
        i += 1
    if key is None:
        return
    os.environ["FEDML_API_KEY"] = key
    os.execv(sys.executable, [sys.executable, "-m", "fedml_cli.main", *out])


# typer turns every command of the tree into a click command (its signature, its annotations evaluated) before it
# runs one: ~75 commands, 0.1-0.2 s on every `fedml` call. A call builds only the path its words name (a top-level
# command, or a group and one of its commands), with the same usage lines, help and errors as the whole tree
# (tests/test_cli_output.py compares them); anything else (top-level options, a word no command has, the shell
# asking for completions) builds the whole tree.
def pruned(argv: list[str]) -> typer.Typer | None:
    """`app` holding only the command path `argv` starts with, or None where the whole tree is needed."""
    if any(k.startswith("_FEDML") and k.endswith("_COMPLETE") for k in os.environ):
        return None
    if not argv or argv[0].startswith("-"):
        return None
    top = _only(app, argv[0])
    if top is None:
        return None
    if top.registered_groups and argv[1:2] and not argv[1].startswith("-"):
        group = top.registered_groups[0]
        inner = _only(group.typer_instance, argv[1]) if group.typer_instance is not None else None
        if inner is not None:  # (else the whole group: its help, or its error for a word it has no command for)
            group = copy.copy(group)
            group.typer_instance = inner
            top.registered_groups = [group]
    return top


def _only(t: typer.Typer, name: str) -> typer.Typer | None:
    """A shallow copy of `t` with only its command or group called `name` (None: no such one, or two)."""
    commands = [c for c in t.registered_commands
                if (c.name or (c.callback and typer.main.get_command_name(c.callback.__name__))) == name]
    groups = [g for g in t.registered_groups if g.name == name]
    if len(commands) + len(groups) != 1:
        return None
    one = copy.copy(t)
    one.registered_commands, one.registered_groups = commands, groups
    return one


def main() -> None:
    if sys.argv[1:3] in (["device", "bind"], ["device", "unbind"]):  # FedML's names, as the commands they are
        sys.argv[1:3] = ["login" if sys.argv[2] == "bind" else "logout"]
    if sys.argv[1:2] == ["login"]:
        cluster.reexec_without_key(sys.argv[1:])
    if sys.argv[1:2] == ["launch"]:
        _launch_key_out_of_argv(sys.argv[1:])
    try:
        (pruned(sys.argv[1:]) or app)()
    except CliError as exc:
        _err(f"error: {exc}")
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
