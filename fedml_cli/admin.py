"""Cluster administration: `fedml node list|drain|remove`, `fedml scheduler key ...` and `... token ...`.

Imported by main.py at start-up, so only typer is imported at module level.
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from .cluster import _labels
from .errors import USAGE, CliError
from .output import JsonOpt, print_json
from .output import err as _err

node_app = typer.Typer(help="List, drain and remove the nodes of the cluster.", no_args_is_help=True,
                       rich_markup_mode=None)
key_app = typer.Typer(help="Create, list and revoke API keys (admin key needed).", no_args_is_help=True,
                      rich_markup_mode=None)

token_app = typer.Typer(help="Join tokens: how nodes join a shared cluster (admin key needed).", no_args_is_help=True,
                        rich_markup_mode=None)


# ---- node --------------------------------------------------------------------------------------------------

def _gpu_summary(n: dict[str, Any]) -> str:
    by_type: dict[str, list[int]] = {}
    free = set(n.get("gpus_free", []))
    for g in n.get("gpus", []):
        t = by_type.setdefault(g["name"], [0, 0])
        t[1] += 1
        t[0] += g["index"] in free
    out = ", ".join(f"{f}/{t} {name}" for name, (f, t) in by_type.items()) or "-"
    if n.get("gpus_busy_outside"):  # a process of no run holds them (agents' NVML samples): not offered to runs
        out += f" [yellow](GPU {','.join(map(str, n['gpus_busy_outside']))} busy outside the scheduler)[/yellow]"
    samples = n.get("gpu_samples") or []
    if samples:
        out += " util " + " ".join(f"{s['util']}%" if s.get("util") is not None else "-" for s in samples)
    return out


@node_app.command("list")
def node_list(as_json: JsonOpt = False) -> None:
    """Nodes: state, GPUs free/total by type, labels, price, last heartbeat."""
    from .api import connect

    nodes = connect().get("/nodes")
    if as_json:
        print_json(nodes)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "ID", "STATE", "GPUS FREE/TOTAL", "RUNS", "TENANCY", "LABELS", "PRICE/GPU-H", "LAST HEARTBEAT"):
        table.add_column(col)
    now = time.time()
    for n in nodes:
        state = n["state"] + (" DRAINING" if n.get("draining") else "")
        color = "green" if state == "ONLINE" else ("yellow" if "DRAINING" in state else "red")
        table.add_row(n["name"], n["id"], f"[{color}]{state}[/{color}]", _gpu_summary(n), str(n.get("active_runs", 0)),
                      tenancy(n), ",".join(f"{k}={v}" for k, v in n.get("labels", {}).items()) or "-",
                      "-" if n.get("price_per_gpu_hour") is None else f"{n['price_per_gpu_hour']:g}",
                      f"{now - n['last_seen']:.0f}s ago")
    console = Console() if sys.stdout.isatty() else Console(width=250)  # piped: keep ids whole
    if nodes:
        console.print(table)
    else:
        console.print("no nodes (make a join token with `fedml scheduler token create --node`, then on the node: "
                      "`fedml login --server URL --node`)")


def tenancy(n: dict[str, Any]) -> str:
    """'shared (jobs as fedml-job)', 'single-tenant: alice' (only alice's runs: a private node, or an agent that
    cannot keep jobs from its key)."""
    if n.get("owner"):
        return f"single-tenant: {n['owner']}"
    teams = f", teams {','.join(n['teams'])}" if n.get("teams") else ""
    return (f"shared (jobs as {n['job_user']}{teams})" if n.get("job_user") else
            f"shared ({teams[2:]})" if teams else "shared")


@node_app.command("gpus")
def node_gpus(name: Annotated[str, typer.Argument(metavar="NAME", help="Node name or id.")],
              since: Annotated[str, typer.Option("--since", help="How far back: 30m, 6h, 7d (a week at most).")] = "1h",
              as_json: JsonOpt = False) -> None:
    """Each GPU of a node over time, as its agent sampled it: utilisation, memory used, power and temperature
    (every 5 s over the last hour, minute means before it, kept a week), with a sparkline of utilisation."""
    from .api import connect

    seconds = since_seconds(since)
    if not seconds <= 7 * 86400:
        raise CliError(f"--since: between 1s and 7d, got {since!r}", USAGE)
    got = connect().get(f"/nodes/{name}/gpus", params={"since": seconds})
    if as_json:
        print_json(got)
        return
    from rich.console import Console
    from rich.table import Table

    from .runs import sparkline

    table = Table(box=None, header_style="bold", title=f"{got['name']}: GPUs over the last {since}")
    for col in ("GPU", "NAME", "UTIL NOW", "UTIL MEAN", "MEM USED", "POWER", "TEMP", "POINTS", "UTILISATION"):
        table.add_column(col)
    for g in got["gpus"]:
        pts = g["points"]
        util = [p[1] for p in pts if p[1] is not None]
        last = pts[-1] if pts else None

        def val(i: int, unit: str, last: list[Any] | None = last) -> str:
            return "-" if last is None or last[i] is None else f"{last[i]:.0f}{unit}"

        table.add_row(str(g["index"]), g["name"], val(1, "%"), f"{sum(util) / len(util):.0f}%" if util else "-",
                      val(2, " MB"), val(3, " W"), val(4, " C"), str(len(pts)), sparkline(util, 48))
    (Console() if sys.stdout.isatty() else Console(width=250)).print(table)  # (piped: nothing cut)


@node_app.command("drain")
def node_drain(name: Annotated[str, typer.Argument(metavar="NAME", help="Node name or id.")],
               undo: Annotated[bool, typer.Option("--undo", help="Accept new runs again.")] = False) -> None:
    """Stop placing new runs on a node; runs already there finish."""
    from .api import connect

    n = connect().post(f"/nodes/{name}/drain", params={"undo": undo})
    _err(f"Node {n['name']} " + ("accepts new runs again." if undo else "is draining: no new runs; running ones finish."))


@node_app.command("remove")
def node_remove(name: Annotated[str, typer.Argument(metavar="NAME", help="Node name or id.")]) -> None:
    """Remove a node: its runs become LOST (requeued per their retry policy) and its key is revoked."""
    from .api import connect

    n = connect().delete(f"/nodes/{name}")
    _err(f"Node {n['name']} ({n['id']}) removed.")


# ---- keys --------------------------------------------------------------------------------------------------

@key_app.command("create")
def key_create(name: Annotated[str, typer.Argument(metavar="NAME", help="Who the key is for (its runs are theirs).")],
               admin: Annotated[bool, typer.Option("--admin", help="An admin key (sees all runs, manages nodes/keys).")] = False,
               metrics: Annotated[bool, typer.Option("--metrics", help="A key that reads GET /metrics (Prometheus) "
                                                                       "and nothing else.")] = False,
               team: Annotated[str | None, typer.Option("--team", help="The team whose runs it launches "
                                                                       "(`fedml team create` first).")] = None,
               as_json: JsonOpt = False) -> None:
    """Create a key and print its secret once."""
    from .api import connect

    if admin and metrics:
        raise CliError("--admin and --metrics: a key is one or the other", USAGE)
    params = {"name": name, "scope": "admin" if admin else "metrics" if metrics else "user"}
    r = connect().post("/keys", params={**params, **({"team": team} if team else {})})
    if as_json:
        print_json(r)
        return
    sys.stdout.write(r["secret"] + "\n")
    team_note = f", team {r['key']['team']}" if r["key"].get("team") else ""
    _err(f"Key {r['key']['id']} for {name} ({r['key']['scope']}{team_note}). The secret above is shown only now.")


@key_app.command("list")
def key_list(as_json: JsonOpt = False) -> None:
    """Keys: id, name, scope, created, revoked (never the secrets)."""
    from .api import connect

    keys = connect().get("/keys")
    if as_json:
        print_json(keys)
        return
    for k in keys:
        state = "revoked" if k.get("revoked_at") else "active"
        sys.stdout.write(f"{k['id']:<14} {k['scope']:<6} {state:<8} {k['prefix']}…  {k['name']}\n")


@key_app.command("revoke")
def key_revoke(ref: Annotated[str, typer.Argument(metavar="ID_OR_NAME")]) -> None:
    """Revoke a key: requests with it are refused from now on."""
    from .api import connect

    k = connect().delete(f"/keys/{ref}")
    _err(f"Key {k['id']} ({k['name']}) revoked.")


def since_seconds(text: str) -> float:
    """--since's duration in seconds (more than 0), or a one-line usage error."""
    try:
        seconds = _duration(text)
    except typer.BadParameter as exc:
        raise CliError(f"--since: {exc.message}", USAGE) from None
    if seconds is None or seconds <= 0:
        raise CliError(f"--since: a duration such as 1h, 7d or 30d, got {text!r}", USAGE)
    return seconds


def _duration(text: str) -> float | None:
    """'30m', '2h', '7d', '3600' (seconds), 'never' -> seconds (None: never)."""
    text = text.strip().lower()
    if text in ("never", "0", "none"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise typer.BadParameter(f"expected a duration such as 30m, 2h, 7d or never, got {text!r}") from None


@token_app.command("create")
def token_create(
    node: Annotated[bool, typer.Option("--node", help="A token that joins nodes (the only kind so far).")] = False,
    ttl: Annotated[str, typer.Option("--ttl", help="How long it works: 30m, 2h, 7d, never.")] = "1h",
    uses: Annotated[int, typer.Option("--uses", min=0, help="Nodes it may join (0: any number until it expires).")] = 1,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", metavar="K=V",
                                                    help="Label every node joined with it gets; repeatable.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="What it is for, shown in `key list`.")] = None,
    team: Annotated[list[str] | None, typer.Option("--team", help="Nodes joined with it run only this team's runs; "
                                                                   "repeatable (docs/teams.md).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a join token (printed once, stored hashed). On the node: `fedml login --server URL --node` and paste
    it, or pipe it in. Nodes joined so run every user's jobs (with --team: only those teams'), as an unprivileged
    user, so join them as root."""
    from .api import connect

    if not node:
        _err("error: say what the token is for: --node")
        raise typer.Exit(USAGE)
    labels = _labels(label)
    r = connect().post("/tokens", json={"ttl": _duration(ttl), "uses": uses or None, "labels": labels, "name": name,
                                        "teams": list(team or [])})
    if as_json:
        print_json(r)
        return
    sys.stdout.write(r["secret"] + "\n")
    k = r["key"]
    left = "any number of nodes" if k["uses_left"] is None else f"{k['uses_left']} node(s)"
    until = ("never expires" if k["expires_at"] is None
             else f"expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(k['expires_at']))}")
    _err(f"Join token {k['id']}: joins {left}, {until}. Shown only now. On a node (as root): "
         f"echo TOKEN | fedml login --server URL --node")


__all__ = ["key_app", "node_app", "token_app"]
