"""Teams (docs/teams.md): admins make, change and remove them; a person sees the team their key belongs to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from ..contract.models import Principal, Team, TeamBudget, TeamCreate, TeamNotify, TeamQuota
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=API)


@router.post("/teams", status_code=201)
def create_team(body: TeamCreate, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Team:
    return c.sched.create_team(body, who)


@router.get("/teams")
def list_teams(who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> list[dict[str, Any]]:
    """The teams the caller may see, each with `quota_held`: GPUs its runs hold against each quota now."""
    return c.sched.teams_held(who)


@router.get("/teams/{name}")
def show_team(name: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    return c.sched.team_view(name, who)


@router.delete("/teams/{name}")
def delete_team(name: str, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Team:
    return c.sched.delete_team(name, who)


@router.put("/teams/{name}/notify")
def team_notify(name: str, body: TeamNotify, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Team:
    """The webhook targets of the team's runs whose job names none (signed with the team's secret: GET
    /webhooks/secret?owner=team:NAME)."""
    return c.sched.set_team_notify(name, body, who)


@router.put("/teams/{name}/quota")
def team_quota(name: str, body: TeamQuota, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Team:
    """The team's GPU quotas: {"gpus": {"A100-80G": 8, "any": 4}} (empty: none)."""
    return c.sched.set_team_quota(name, body, who)


@router.put("/teams/{name}/budget")
def team_budget(name: str, body: TeamBudget, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Team:
    """The team's budget: {"amount": 500, "period": "month"} (amount null: none)."""
    return c.sched.set_team_budget(name, body, who)


@router.get("/usage")
def usage(by: str = Query("team", pattern="^(team|user|run)$"),
          since: float = Query(7 * 86400.0, gt=0, le=400 * 86400, description="seconds back"),
          team: str | None = Query(None, max_length=40),
          who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> dict[str, Any]:
    """GPU-hours and cost of the runs created in the window, by team, user or run (`fedml usage`)."""
    return c.sched.usage(who, by, since, team)
