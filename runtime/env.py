"""The environment a run sees: FedML's variables, torch.distributed's, the job's own `envs` and `--env`."""

from __future__ import annotations

import os
import sys

from scheduler.contract.jobspec import JobSpec

# Variables of the agent's own environment that a job should not inherit.
_DROP = ("FEDML_API_KEY", "FEDML_SCHEDULER_TOKEN", "FEDML_SERVER", "FEDML_ADMIN_KEY")
# A job that runs as another user than its agent (a root agent) inherits only these of the agent's environment:
# whatever else the admin's shell held (cloud credentials, tokens) stays with the agent.
_KEEP_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "OPENBLAS_", "MKL_", "OMP_", "GLOO_", "TORCH_")
_KEEP = {"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "http_proxy",
         "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"}


def _inherited(env: dict[str, str] | os._Environ[str], separate: bool) -> dict[str, str]:
    if not separate:
        return {k: v for k, v in env.items() if k not in _DROP}
    return {k: v for k, v in env.items() if k in _KEEP or k.startswith(_KEEP_PREFIXES)}


def run_env(*, run_id: str, spec: JobSpec, node_id: str, rank: int = 0, num_nodes: int = 1,
            node0_addr: str = "127.0.0.1", node0_port: int = 29500, gpus: list[int] | None = None,
            overrides: dict[str, str] | None = None, base: dict[str, str] | None = None,
            artifact_dir: str | None = None, attempt: int = 1,
            user: tuple[str, str] | None = None) -> dict[str, str]:
    """`user`: (name, home) when the job runs as another user than the agent."""
    env = _inherited(os.environ if base is None else base, user is not None)
    if user is not None:
        env.update({"USER": user[0], "LOGNAME": user[0], "HOME": user[1]})
    if base is None:
        # A job on the host runs the agent's own interpreter first (`python3` of the venv fedml was installed
        # in, with torch), whichever shell started the agent; a job's `envs: {PATH: ...}` still wins.
        here = os.path.dirname(sys.executable)
        rest = [p for p in env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep) if p and p != here]
        env["PATH"] = os.pathsep.join([here, *rest])
    env.update(spec.fedml_env_vars())
    env.update({
        "FEDML_CURRENT_RUN_ID": run_id,
        "FEDML_CURRENT_EDGE_ID": node_id,
        "FEDML_CLIENT_RANK": str(rank),
        "FEDML_NUM_NODES": str(num_nodes),
        "FEDML_NODE_0_ADDR": node0_addr,
        "FEDML_NODE_0_PORT": str(node0_port),
        "FEDML_SERVER_ADDR": node0_addr,  # federate: where rank 0 (the server) runs
        "FEDML_JOB_TYPE": spec.job_type,
        "FEDML_ATTEMPT": str(attempt),  # jobs can fence their own outputs by attempt
        "NODE_RANK": str(rank),
        "WORLD_SIZE": str(num_nodes),
        "MASTER_ADDR": node0_addr,
        "MASTER_PORT": str(node0_port),
        # Job output goes to files the agent tails; unbuffered Python makes it arrive as it is printed.
        "PYTHONUNBUFFERED": "1",
    })
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus or [])
    if artifact_dir:
        env["FEDML_ARTIFACT_DIR"] = artifact_dir  # files left here are kept by the scheduler (`fedml run artifacts`)
    env.update(spec.envs)
    env.update(overrides or {})
    return env
