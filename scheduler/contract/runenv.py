"""The variables a run's job is given by the scheduler and its job file (runtime/env.py adds the agent's own
environment to them), and the same for display with secrets hidden (the dashboard's run page)."""

from __future__ import annotations

import re

from .jobspec import JobSpec

# Names whose values are shown as hidden: API keys, tokens, passwords, credentials.
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|PRIVATE|COOKIE|SESSION|SIGNATURE", re.I)
HIDDEN = "(hidden)"


def job_env(*, run_id: str, spec: JobSpec, node_id: str, rank: int, num_nodes: int, node0_addr: str,
            node0_port: int, gpus: list[int] | None, attempt: int, artifact_dir: str | None,
            overrides: dict[str, str] | None) -> dict[str, str]:
    """FedML's FEDML_ENV_* of the job file, the run's identity and rendezvous (FedML's and torch.distributed's
    names), its GPUs, then the job's `envs` and the launch's `--env` over them."""
    env = spec.fedml_env_vars()
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
    # The GPUs given are NVML's indexes (the agent's inventory and samples): CUDA numbers devices the same way only
    # in PCI bus order (its default puts the fastest first, another GPU on a mixed node).
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpus or [])
    if artifact_dir:
        env["FEDML_ARTIFACT_DIR"] = artifact_dir  # files left here are kept by the scheduler (`fedml run artifacts`)
    env.update(spec.envs)
    env.update(overrides or {})
    return env


def shown(env: dict[str, str]) -> dict[str, str]:
    """`env` with the values of secret-looking names hidden."""
    return {k: HIDDEN if SECRET_NAME.search(k) and v else v for k, v in sorted(env.items())}
