"""`fedml team ...`: teams of people sharing the GPUs (docs/teams.md). Only typer at module level."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .errors import USAGE, CliError
from .output import JsonOpt, print_json
from .output import err as _err

team_app = typer.Typer(help="Teams: every key of a person can belong to one, and its runs are the team's "
                            "(docs/teams.md).", no_args_is_help=True, rich_markup_mode=None)

TeamArg = Annotated[str, typer.Argument(metavar="TEAM", help="The team's name.")]


@team_app.command("create")
def team_create(name: TeamArg,
                shares: Annotated[int, typer.Option("--shares", min=1, help="Its weight among teams.")] = 1,
                as_json: JsonOpt = False) -> None:
    """Make a team (admin). Then give its people keys: `fedml scheduler key create NAME --team TEAM`."""
    from .api import connect

    team = connect().post("/teams", json={"name": name, "shares": shares})
    if as_json:
        print_json(team)
        return
    _err(f"Team {team['name']} made (shares {team['shares']}). Keys for it: "
         f"`fedml scheduler key create NAME --team {team['name']}`.")


@team_app.command("list")
def team_list(as_json: JsonOpt = False) -> None:
    """Teams (an admin sees all of them; a person the team of their key)."""
    from .api import connect

    teams = connect().get("/teams")
    if as_json:
        print_json(teams)
        return
    if not teams:
        _err("no teams (an admin makes one with `fedml team create NAME`)")
        return
    for t in teams:
        hooks = f"  webhooks: {len(t['notify'])}" if t.get("notify") else ""
        sys.stdout.write(f"{t['name']:<24} shares {t['shares']}{hooks}\n")


@team_app.command("show")
def team_show(name: TeamArg, as_json: JsonOpt = False) -> None:
    """A team: its shares, webhooks, keys (admin), and what its runs hold now."""
    from .api import connect

    t = connect().get(f"/teams/{name}")
    if as_json:
        print_json(t)
        return
    out = [f"team       {t['name']}", f"shares     {t['shares']}",
           f"now        {t['active_runs']} active run(s) holding {t['gpus_held']} GPU(s)"
           + (f" ({', '.join(t['users'])})" if t["users"] else "")]
    for kind, cap in (t.get("quotas") or {}).items():
        held = (t.get("quota_held") or {}).get(kind, 0)
        borrowed = f" ({held - cap} borrowed)" if held > cap else ""
        out.append(f"quota      {kind}: {held} of {cap} GPUs held{borrowed}")
    if t.get("quotas") and (limits := _limits(t)):
        out.append(f"borrowing  {limits[2:]}")
    if t.get("budget") is not None:
        out.append(f"budget     {t['budget_spent']:.2f} of {t['budget']:g} spent this {t['budget_period']}")
    for n in t.get("notify") or []:
        out.append(f"webhook    {n['url']}  on {', '.join(n['on'])}")
    for k in t.get("keys") or []:
        out.append(f"key        {k['id']}  {k['scope']:<5}  {k['name']}")
    sys.stdout.write("\n".join(out) + "\n")


@team_app.command("quota")
def team_quota(
    name: TeamArg,
    gpus: Annotated[list[str] | None, typer.Option("--gpus", metavar="TYPE:N", help='GPUs its runs may hold at once, '
                                                   'of a type (A100-80G:8) or of any type (any:4); repeat.')] = None,
    borrow_limit: Annotated[int | None, typer.Option(
        "--borrow-limit", min=0, metavar="N", help="GPUs over each quota its runs may borrow from other teams' idle "
        "quota of the same name (reclaimed by preemption when they need it). Default 0: none.")] = None,
    lend_limit: Annotated[int | None, typer.Option(
        "--lend-limit", min=-1, metavar="N", help="GPUs of each of its idle quotas other teams may borrow (-1: all of "
        "it, the default).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="No quota: its runs are limited by the GPUs alone.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set a team's GPU quotas (admin): a run of the team waits ("holds its quota") while placing it would hold
    more; a run asking for more than the quota (and what it may borrow) is refused at launch. A GPU job is charged
    to its resource_type's quota if the team has one, else to "any". With --borrow-limit, its preemptible runs may
    use other teams' idle quota; they are preempted when those teams need it back (docs/teams.md)."""
    from .api import connect

    if clear and gpus:
        raise CliError("give --gpus TYPE:N (one or more) or --clear, not both", USAGE)
    if not (clear or gpus or borrow_limit is not None or lend_limit is not None):
        raise CliError("give --gpus TYPE:N (one or more), --clear, --borrow-limit N or --lend-limit N", USAGE)
    body: dict[str, object] = {}
    if gpus or clear:
        quotas: dict[str, int] = {}
        for item in gpus or []:
            kind, _, n = item.rpartition(":")
            if not kind or not n.isdigit():
                raise CliError(f"--gpus: TYPE:N, such as A100-80G:8 or any:4, got {item!r}", USAGE)
            quotas[kind] = int(n)
        body["gpus"] = quotas
    if borrow_limit is not None:
        body["borrow_limit"] = borrow_limit
    if lend_limit is not None:
        body["lend_limit"] = lend_limit
    team = connect().put(f"/teams/{name}/quota", json=body)
    if as_json:
        print_json(team)
        return
    said = ", ".join(f"{k}: {v}" for k, v in team["quotas"].items()) or "none"
    _err(f"Team {name}: GPU quotas {said}{_limits(team)}.")


def _limits(t: dict[str, object]) -> str:
    """"; borrows up to 4, lends 2" (what differs from the defaults)."""
    out = []
    if t.get("borrow_limit"):
        out.append(f"borrows up to {t['borrow_limit']} over each")
    if t.get("lend_limit") is not None:
        out.append(f"lends at most {t['lend_limit']} of each")
    return "; " + ", ".join(out) if out else ""


@team_app.command("budget")
def team_budget(
    name: TeamArg,
    amount: Annotated[str | None, typer.Argument(metavar="AMOUNT[/PERIOD]", help="Money per day, week or month "
                                                  "(500/month, 20/day; the period defaults to month).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="No budget.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set a team's budget (admin): once its runs created in the period cost that much (node price x GPUs x
    time), its runs wait for the next period, saying why. Runs already running go on."""
    from .api import connect

    if clear == (amount is not None):
        raise CliError("give AMOUNT[/PERIOD] (500/month) or --clear", USAGE)
    body: dict[str, Any] = {"amount": None}
    if amount is not None:
        money, _, period = amount.partition("/")
        try:
            value = float(money)
        except ValueError:
            value = -1.0
        if value < 0 or (period or "month") not in ("day", "week", "month"):
            raise CliError(f"budget: AMOUNT[/day|week|month], such as 500/month, got {amount!r}", USAGE)
        body = {"amount": value, "period": period or "month"}
    team = connect().put(f"/teams/{name}/budget", json=body)
    if as_json:
        print_json(team)
        return
    _err(f"Team {name}: " + (f"a budget of {team['budget']:g} per {team['budget_period']}."
                              if team.get("budget") is not None else "no budget."))


@team_app.command("delete")
def team_delete(name: TeamArg) -> None:
    """Remove a team (admin): refused while keys belong to it. Its runs keep its name."""
    from .api import connect

    connect().delete(f"/teams/{name}")
    _err(f"Team {name} removed.")


@team_app.command("notify")
def team_notify(
    name: TeamArg,
    url: Annotated[list[str] | None, typer.Option("--url", help="A webhook URL (repeat for more).")] = None,
    on: Annotated[str, typer.Option("--on", help="Events, comma-separated: started, finished, failed, killed, "
                                                  "lost.")] = "finished,failed,lost",
    clear: Annotated[bool, typer.Option("--clear", help="Remove the team's webhooks.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The webhooks of the team's runs whose job names none (admin): signed with the team's secret
    (`fedml notify secret --owner team:TEAM`)."""
    from .api import connect

    if clear == bool(url):
        raise CliError("give --url (one or more) or --clear", USAGE)
    events = [e.strip() for e in on.split(",") if e.strip()]
    body: dict[str, Any] = {"notify": [] if clear else [{"url": u, "on": events} for u in url or []]}
    team = connect().put(f"/teams/{name}/notify", json=body)
    if as_json:
        print_json(team)
        return
    _err(f"Team {name}: {len(team['notify'])} webhook(s).")


def usage(
    by: Annotated[str, typer.Option("--by", help="Sum by team, user or run.")] = "team",
    since: Annotated[str, typer.Option("--since", help="Runs created in the last: 1h, 7d, 30d.")] = "7d",
    team: Annotated[str | None, typer.Option("--team", help="Only this team's runs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """GPU-hours and cost of the runs created in a window, by team, user or run (like Slurm's sreport). An admin
    sees everyone's; a person their own runs. Each run counts whole: all its attempts, a running one up to now."""
    from .admin import since_seconds
    from .api import connect

    if by not in ("team", "user", "run"):
        raise CliError(f"--by: team, user or run, got {by!r}", USAGE)
    seconds = since_seconds(since)
    got = connect().get("/usage", params={"by": by, "since": seconds, **({"team": team} if team else {})})
    if as_json:
        print_json(got)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, header_style="bold", title=f"GPU usage of the runs created in the last {since}")
    cols = [by.upper(), *(("NAME", "OWNER", "STATUS") if by == "run" else ()), "RUNS", "GPU-HOURS", "COST"]
    for col in cols:
        table.add_column(col, justify="right" if col in ("RUNS", "GPU-HOURS", "COST") else "left")
    for row in got["rows"]:
        extra = (escape(row["name"]), escape(row["owner"]), row["status"]) if by == "run" else ()
        table.add_row(escape(str(row[by])), *extra, str(row["runs"]), f"{row['gpu_hours']:.2f}", f"{row['cost']:.2f}")
    total = got["total"]
    table.add_row("total", *(("", "", "") if by == "run" else ()), str(total["runs"]), f"{total['gpu_hours']:.2f}",
                  f"{total['cost']:.2f}", style="bold")
    (Console() if sys.stdout.isatty() else Console(width=250)).print(table)
    if not got["complete"]:
        _err("(the report stopped after 200,000 runs: narrow --since)")
