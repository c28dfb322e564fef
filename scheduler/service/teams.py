"""Teams (docs/teams.md): made and removed by admins; every key of a person may belong to one, and the runs it
launches are the team's (Run.team). A team's webhook targets are the default of its runs whose job names none."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import access
from ..contract.errors import Conflict, Invalid
from ..contract.models import Principal, Run, Team, TeamBudget, TeamCreate, TeamNotify, TeamQuota
from ..store import NotFound
from .core import ACTIVE, SchedulerBase


class TeamsMixin(SchedulerBase):
    def create_team(self, body: TeamCreate, who: Principal) -> Team:
        access.require_admin(who, "only an admin makes teams")
        return self.store.put_team(Team(name=body.name, shares=body.shares), new=True)

    def list_teams(self, who: Principal) -> list[Team]:
        return [_shown(t, who) for t in self.store.list_teams() if access.may_see_team(who, t.name)]

    def teams_held(self, who: Principal) -> list[dict[str, Any]]:
        """The teams `who` may see, each with the GPUs its runs hold against each quota now (the book's count:
        the dashboard's quota bars)."""
        with self._schedule_lock:
            held = dict(self._sync_book().quota_held)  # type: ignore[attr-defined]  # (PlacementMixin's)
        out = []
        for t in self.list_teams(who):
            mine = {k.split("\t", 1)[1]: n for k, n in held.items() if k.split("\t", 1)[0] == t.name}
            out.append({**t.model_dump(mode="json"), "quota_held": mine})
        return out

    def find_team(self, name: str, who: Principal) -> Team:
        team = self.store.get_team(name)
        if team is None or not access.may_see_team(who, name):
            raise NotFound(f"team {name} not found")
        return team

    def team_view(self, name: str, who: Principal) -> dict[str, Any]:
        """The team, its keys (an admin sees them), and what its runs hold now."""
        team = self.find_team(name, who)
        active = [r for r in self.store.list_runs(status=ACTIVE, limit=1_000_000) if r.team == name]
        gpus = sum(len(p.gpus) for r in active for p in r.placements if not p.done)
        keys = [{"id": k.id, "name": k.name, "scope": k.scope, "owner": k.owner}
                for k in self.store.list_keys() if k.team == name and k.revoked_at is None and k.parent is None] \
            if who.admin else []
        held: dict[str, int] = {}
        for r in active:
            if r.quota_key:
                bucket = r.quota_key.split("\t", 1)[1]
                held[bucket] = held.get(bucket, 0) + len(r.gpu_claims())
        return {**_shown(team, who).model_dump(mode="json"), "keys": keys, "active_runs": len(active), "gpus_held": gpus,
                "users": sorted({r.owner for r in active}), "quota_held": held,
                "budget_spent": None if team.budget is None else round(self.team_spent(team), 4)}

    def delete_team(self, name: str, who: Principal) -> Team:
        access.require_admin(who, "only an admin removes teams")
        team = self.find_team(name, who)
        members = [k.name for k in self.store.list_keys() if k.team == name and k.revoked_at is None]
        if members:
            raise Conflict(f"team {name} has {len(members)} active key(s) ({', '.join(sorted(members)[:5])}): "
                           "revoke them first (`fedml scheduler key revoke NAME`)")
        self.store.delete_team(name)
        self._teams.pop(name, None)
        return team

    def set_team_quota(self, name: str, body: TeamQuota, who: Principal) -> Team:
        """A team's GPU quotas, and how much over them it may borrow and of them it lends (docs/teams.md): its runs
        wait when placing one would hold more. Runs placed before a quota was lowered keep running."""
        access.require_admin(who, "only an admin sets a team's quotas")
        update: dict[str, Any] = {}
        if body.gpus is not None:
            update["quotas"] = dict(body.gpus)
        if body.borrow_limit is not None:
            update["borrow_limit"] = body.borrow_limit
        if body.lend_limit is not None:
            update["lend_limit"] = None if body.lend_limit < 0 else body.lend_limit
        with self.store.lock(f"team:{name}"):
            team = self.find_team(name, who)
            team = self.store.put_team(team.model_copy(update=update))
        self._teams.pop(name, None)
        self._teams_all = None  # type: ignore[assignment]  # (PreemptionMixin's)
        self.kick()  # (a raised quota may let runs start)
        return team

    def set_team_budget(self, name: str, body: TeamBudget, who: Principal) -> Team:
        """A team's budget in money per day, week or month (docs/teams.md): once its runs created in the period
        cost that much, its runs wait for the next period."""
        access.require_admin(who, "only an admin sets a team's budget")
        with self.store.lock(f"team:{name}"):
            team = self.find_team(name, who)
            team = self.store.put_team(team.model_copy(update={"budget": body.amount, "budget_period": body.period}))
        self._teams.pop(name, None)
        self._spent_at = 0.0  # (counted again at the next pass)
        self.kick()
        return team

    # Fair share (docs/teams.md): teams' (and their users') GPU-seconds, each weighed down by half every half-life
    # since it was used (a run's at its end; a running one's now), counted over the runs at most every
    # FAIR_REFRESH_S. FEDML_FAIRSHARE_HALF_LIFE (seconds) sets the half-life; the default is 7 days (Slurm's).
    FAIR_REFRESH_S = 60.0
    _fair: tuple[float, tuple[dict[str, float], dict[tuple[str, str], float]] | None] | None = None

    def half_life(self) -> float:
        return float(os.environ.get("FEDML_FAIRSHARE_HALF_LIFE") or 7 * 86400)

    def fair_usage(self) -> tuple[dict[str, float], dict[tuple[str, str], float]] | None:
        """(team -> decayed GPU-seconds / its shares, (team, user) -> decayed GPU-seconds), or None when there are
        no teams (then the queue is in priority and arrival order alone)."""
        got = self._fair
        # (the scheduler's loop refreshes it every FAIR_REFRESH_S outside any pass: a pass counts it itself only
        # when nothing has for three times that, or the first time)
        if got is not None and time.time() - got[0] <= 3 * self.FAIR_REFRESH_S:
            return got[1]
        return self.refresh_fair_usage()

    def refresh_fair_usage(self) -> tuple[dict[str, float], dict[tuple[str, str], float]] | None:
        """Count fair_usage() again (reads the runs of the last 5 half-lives, up to USAGE_SCAN of them)."""
        now = time.time()
        teams = {t.name: t for t in self.store.list_teams()}
        if not teams:
            self._fair = (now, None)
            return None
        half = self.half_life()
        start = now - 5 * half  # (older use weighs under 1/32: left out)
        by_team: dict[str, float] = {}
        by_user: dict[tuple[str, str], float] = {}
        for r in Recent(self.store, start, self.USAGE_SCAN):  # (a run created before is left out, even if it runs)
            spent = r.spend(now).gpu_seconds
            if not spent:
                continue
            used = spent * 0.5 ** (max(0.0, now - (r.ended_at or now)) / half)
            team = r.team or ""
            by_team[team] = by_team.get(team, 0.0) + used
            by_user[(team, r.owner)] = by_user.get((team, r.owner), 0.0) + used
        factors = {t: u / (teams[t].shares if t in teams else 1) for t, u in by_team.items()}
        self._fair = (now, (factors, by_user))
        return factors, by_user

    BUDGET_REFRESH_S = 30.0
    _spent: dict[str, float] | None = None
    _spent_at = 0.0

    def team_spent(self, team: Team) -> float:
        """What the team's runs created in its budget's current period cost so far: every budgeted team's, counted
        in one pass over the runs at most every BUDGET_REFRESH_S (a run's cost grows while it runs)."""
        now = time.time()
        if self._spent is None or now - self._spent_at > self.BUDGET_REFRESH_S:
            budgeted = {t.name: t.period_start(now) for t in self.store.list_teams() if t.budget is not None}
            spent = dict.fromkeys(budgeted, 0.0)
            if budgeted:
                for r in Recent(self.store, min(budgeted.values()), self.USAGE_SCAN):
                    if r.team in budgeted and r.created_at >= budgeted[r.team]:
                        spent[r.team] += r.spend(now).cost
            self._spent, self._spent_at = spent, now
        return self._spent.get(team.name, 0.0)

    def set_team_notify(self, name: str, body: TeamNotify, who: Principal) -> Team:
        access.require_admin(who, "only an admin sets a team's webhooks")
        with self.store.lock(f"team:{name}"):
            team = self.find_team(name, who)
            team = self.store.put_team(team.model_copy(update={"notify": body.notify}))
        self._teams.pop(name, None)
        return team

    USAGE_SCAN = 200_000  # runs a usage report reads at most (it says when it stopped there)

    def usage(self, who: Principal, by: str, since: float, team: str | None = None) -> dict[str, Any]:
        """GPU-hours and cost of the runs created in the last `since` seconds, summed by team, user or run (an
        admin's report covers everyone; a person's their own runs), as `sreport` does for Slurm. Each run counts
        whole (all its attempts, the current one up to now): the rows add up to the runs' own figures exactly."""
        if by not in ("team", "user", "run"):
            raise Invalid("by: team, user or run")
        owner = access.runs_listed_for(who)
        now = time.time()
        start = now - since
        rows: dict[str, dict[str, Any]] = {}
        recent = Recent(self.store, start, self.USAGE_SCAN, owner)
        for r in recent:
            if team is not None and r.team != team:
                continue
            spent = r.spend(now)
            key = {"team": r.team or "-", "user": r.owner, "run": r.id}[by]
            row = rows.setdefault(key, {by: key, "runs": 0, "gpu_seconds": 0.0, "cost": 0.0})
            if by == "run":
                row.update(name=r.name, owner=r.owner, team=r.team, status=r.status.value)
            row["runs"] += 1
            row["gpu_seconds"] += spent.gpu_seconds
            row["cost"] += spent.cost
        complete = recent.complete
        out = sorted(rows.values(), key=lambda x: -x["gpu_seconds"])
        for row in out:
            row["gpu_hours"] = round(row["gpu_seconds"] / 3600, 4)
            row["gpu_seconds"] = round(row["gpu_seconds"], 3)
            row["cost"] = round(row["cost"], 4)
        return {"by": by, "since": start, "until": now, "rows": out, "complete": complete,
                "total": {"runs": sum(x["runs"] for x in out), "gpu_hours": round(sum(x["gpu_seconds"] for x in out) / 3600, 4),
                          "cost": round(sum(x["cost"] for x in out), 4)}}

class Recent:
    """The runs created since `start` (of `owner`, if given), newest first, read 2,000 at a time and `most` at
    most: `complete` says, once iterated, whether that was all of them."""

    PAGE = 2000

    def __init__(self, store: Any, start: float, most: int, owner: str | None = None) -> None:
        self.store, self.start, self.most, self.owner = store, start, most, owner
        self.complete = True

    def __iter__(self) -> Iterator[Run]:
        before, scanned = None, 0
        while True:
            page = self.store.list_runs(owner=self.owner, limit=self.PAGE, before=before)
            for r in page:
                if r.created_at < self.start:
                    return
                yield r
            scanned += len(page)
            if len(page) < self.PAGE:
                return
            if scanned >= self.most:
                self.complete = False
                return
            before = (page[-1].created_at, page[-1].id)


def _shown(team: Team, who: Principal) -> Team:
    """The team as `who` may see it: a webhook URL's query and fragment (where receivers keep tokens) are an
    admin's to read."""
    if who.admin or not team.notify:
        return team
    hidden = [t.model_copy(update={"url": urlunsplit(urlsplit(t.url)._replace(query="", fragment=""))})
              for t in team.notify]
    return team.model_copy(update={"notify": hidden})
