"""The environment a run sees: FedML's variables, torch.distributed's, the job's own `envs` and `--env`."""

from __future__ import annotations

import os
import sys

from scheduler.contract.jobspec import JobSpec
from scheduler.contract.runenv import job_env

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
    env.update(job_env(run_id=run_id, spec=spec, node_id=node_id, rank=rank, num_nodes=num_nodes,
                       node0_addr=node0_addr, node0_port=node0_port, gpus=gpus, attempt=attempt,
                       artifact_dir=artifact_dir, overrides=overrides))
    return env
