"""Teams (docs/teams.md): made and removed by admins; every key of a person may belong to one, and the runs it
launches are the team's (Run.team). A team's webhook targets are the default of its runs whose job names none."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import access
from ..contract.errors import Conflict
from ..contract.models import Principal, Team, TeamCreate, TeamNotify
from ..store import NotFound
from .core import ACTIVE, SchedulerBase


class TeamsMixin(SchedulerBase):
    def create_team(self, body: TeamCreate, who: Principal) -> Team:
        access.require_admin(who, "only an admin makes teams")
        return self.store.put_team(Team(name=body.name, shares=body.shares), new=True)

    def list_teams(self, who: Principal) -> list[Team]:
        return [_shown(t, who) for t in self.store.list_teams() if access.may_see_team(who, t.name)]

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
        return {**_shown(team, who).model_dump(mode="json"), "keys": keys, "active_runs": len(active), "gpus_held": gpus,
                "users": sorted({r.owner for r in active})}

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

    def set_team_notify(self, name: str, body: TeamNotify, who: Principal) -> Team:
        access.require_admin(who, "only an admin sets a team's webhooks")
        with self.store.lock(f"team:{name}"):
            team = self.find_team(name, who)
            team = self.store.put_team(team.model_copy(update={"notify": body.notify}))
        self._teams.pop(name, None)
        return team


def _shown(team: Team, who: Principal) -> Team:
    """The team as `who` may see it: a webhook URL's query and fragment (where receivers keep tokens) are an
    admin's to read."""
    if who.admin or not team.notify:
        return team
    hidden = [t.model_copy(update={"url": urlunsplit(urlsplit(t.url)._replace(query="", fragment=""))})
              for t in team.notify]
    return team.model_copy(update={"notify": hidden})
