"""Clusters: named sets of nodes (`fedml cluster ...`; scheduler/service/clusters.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Query

from ..contract.models import Cluster, ClusterCreate, Principal
from .deps import API, Ctx, auth, ctx

router = APIRouter(prefix=f"{API}/clusters")
Name = Path(max_length=63)


@router.get("")
def list_clusters(who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> list[Cluster]:
    return c.sched.clusters(who)


@router.get("/{name}")
def get_cluster(name: str = Name, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Cluster:
    return c.sched.cluster(name, who)


@router.post("/{name}", status_code=201)
def create_cluster(body: ClusterCreate, name: str = Name, who: Principal = Depends(auth),
                   c: Ctx = Depends(ctx)) -> Cluster:
    return c.sched.create_cluster(name, body, who)


@router.post("/{name}/stop")
def stop_cluster(name: str = Name, kill: bool = False, who: Principal = Depends(auth),
                 c: Ctx = Depends(ctx)) -> Cluster:
    return c.sched.stop_cluster(name, who, kill=kill)


@router.post("/{name}/start")
def start_cluster(name: str = Name, who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Cluster:
    return c.sched.start_cluster(name, who)


@router.post("/{name}/autostop")
def autostop_cluster(name: str = Name, minutes: float | None = Query(default=None), stop_agents: bool = False,
                     who: Principal = Depends(auth), c: Ctx = Depends(ctx)) -> Cluster:
    return c.sched.autostop_cluster(name, minutes, who, stop_agents=stop_agents)
