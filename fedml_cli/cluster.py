"""`fedml login` and `fedml logout`: client credentials, and joining (or leaving) this machine as a node or a
Kubernetes pool.

Imported by main.py at start-up, so only typer is imported at module level.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import UNREACHABLE, USAGE
from .local import alive as _alive
from .output import err as _err


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _labels(items: list[str] | None) -> dict[str, str]:
    """--label K=V (repeatable) as a dict; exit 2 naming the bad one."""
    labels: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            _err(f'error: --label: expected KEY=VALUE, got "{item}"')
            raise typer.Exit(USAGE)
        labels[k] = v
    return labels


def _agent_pid(home: Path) -> int | None:
    try:
        pid = int((home / "agent.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if b"agents.agent" in cmd or b"agents.k8s_agent" in cmd else None


# ---- login / logout ----------------------------------------------------------------------------------------

def _free_home(name: str, what: str) -> Path:
    """The state directory of node (or pool) NAME on this machine; refused while an agent of that name runs."""
    from scheduler.contract import paths

    home = paths.node_home(name)
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home.parent, 0o711)  # a job may pass through to its own directory, and list no other node's
    pid = _agent_pid(home)
    if pid:
        _err(f"error: {what} {name} already runs here (agent pid {pid}); `fedml logout --name {name}` first")
        raise typer.Exit(USAGE)
    return home


def login(
    api_key: Annotated[str | None, typer.Argument(metavar="API_KEY", help="API key or join token (default: "
                                                  "$FEDML_API_KEY, else read from stdin or a prompt). Given here, it "
                                                  "is taken out of this process's arguments at once.")] = None,
    server: Annotated[str | None, typer.Option("--server", "-s", help="Scheduler URL, e.g. http://head:8787 "
                                                                          "(default: $FEDML_SERVER).")] = None,
    node: Annotated[bool, typer.Option("--node", "--compute", "-c", help="Join this machine as a node: start an "
                                                                         "agent (-c: FedML's compute node).")] = False,
    client: Annotated[bool, typer.Option("--client", help="Only store the credentials, even when no --server is "
                                                          "given (without --server, FedML's `fedml login KEY` "
                                                          "joins the machine as a node).")] = False,
    fedml_version: Annotated[str | None, typer.Option("--version", "-v", metavar="ENV", hidden=True,
                                                      help="FedML's platform environment: accepted, no effect.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Node name (default: host name).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", "-l", metavar="K=V", help="Node label; repeatable.")] = None,
    gpus: Annotated[str | None, typer.Option("--gpus", metavar="TYPE:N[:MEM_MB]",
                                             help="Declare GPUs where NVML is absent, e.g. A100-80G:4.")] = None,
    price: Annotated[float | None, typer.Option("--price-per-gpu-hour", min=0, help="Price of one GPU-hour.")] = None,
    address: Annotated[str | None, typer.Option("--address", help="Address other nodes reach this one at "
                                                                  "(default: detected).")] = None,
    foreground: Annotated[bool, typer.Option("--foreground", help="With --node: run the agent in the foreground "
                                                                  "(systemd, containers).")] = False,
    kubernetes: Annotated[bool, typer.Option("--kubernetes", help="Join a Kubernetes cluster (or namespace) as a node "
                                                                  "pool: one agent runs jobs there as batch/v1 Jobs.")] = False,
    context: Annotated[str | None, typer.Option("--context", help="With --kubernetes: kubeconfig context "
                                                                  "(default: the current one).")] = None,
    namespace: Annotated[str | None, typer.Option("--namespace", help="With --kubernetes: where Jobs go "
                                                                      "(default: the context's).")] = None,
    image: Annotated[str | None, typer.Option("--image", help="With --kubernetes: image for jobs without "
                                                              "docker.image.")] = None,
    run_as: Annotated[str | None, typer.Option("--run-as", metavar="USER", help="With --node: user jobs run as. "
                                               "Default: fedml-job (made if missing) when the agent runs as root; "
                                               "otherwise the agent's own user, and the node runs only your runs.")] = None,
    reclaim_orphans: Annotated[bool, typer.Option("--reclaim-orphans", help="With --node: kill what runs the agent "
                                                  "ran leave on a GPU after they end (orphaned workers).")] = False,
    key_fd: Annotated[int | None, typer.Option("--key-fd", hidden=True)] = None,
) -> None:
    """Store credentials for a scheduler, or with --node join this machine to it as a node.

    With --server and without --node: later commands (launch, logs, run ...) go to SERVER with API_KEY.
    Without --server, on a machine that knows its scheduler (FEDML_SERVER, or an earlier `fedml login`): joins
    this machine as a node, as FedML's `fedml login KEY` does (--client: only store the credentials).
    With --node: registers the node (GPUs from NVML, or --gpus), starts its agent in the background (pid and log
    files under FEDML_HOME/nodes/NAME) and returns; the agent outlives the shell. `fedml logout` stops it.
    With --kubernetes: every node of the cluster becomes a node named POOL-NODE (POOL: --name, default
    k8s-NAMESPACE); KUBECONFIG (or ~/.kube/config) says how to reach it.
    """
    from .api import Api, credentials

    api_key = _given_key(api_key, key_fd)
    known = os.environ.get("FEDML_SERVER") or (credentials() or {}).get("server")
    if server is None and known and not (node or client or kubernetes):
        node = True  # FedML's meaning of `fedml login KEY`: this machine becomes a compute node
        _err(f"(no --server: joining this machine as a node of {known}, as FedML's `fedml login KEY` does; "
             "--client only stores the credentials)")
    if node and client:
        _err("error: --client only stores the credentials; --node (-c) joins this machine as a node: not both")
        raise typer.Exit(USAGE)
    server = (server or known or "").rstrip("/")
    if not api_key or not server:
        _err("error: give API_KEY (or FEDML_API_KEY, or on stdin) and --server (or FEDML_SERVER)")
        raise typer.Exit(USAGE)
    if not server.startswith(("http://", "https://")):
        _err(f'error: --server: expected a URL such as http://head:8787, got "{server}"')
        raise typer.Exit(USAGE)
    if not kubernetes and (pool_opts := [o for o, v in (("--context", context), ("--namespace", namespace),
                                                         ("--image", image)) if v is not None]):
        _err(f"error: {', '.join(pool_opts)} only apply with --kubernetes")
        raise typer.Exit(USAGE)
    node_opts = [o for o, v in (("--name", name), ("--label", label), ("--gpus", gpus), ("--price-per-gpu-hour", price),
                                ("--address", address), ("--foreground", foreground or None), ("--run-as", run_as),
                                ("--reclaim-orphans", reclaim_orphans or None))
                 if v is not None]
    if node_opts and not (node or kubernetes):
        # Node options without --node once stored client credentials and dropped them silently.
        node = True
        _err(f"({', '.join(node_opts)} implies --node: joining this machine as a node)")
    labels = _labels(label)
    if gpus:
        from scheduler.contract.models import parse_gpu_decl

        try:
            parse_gpu_decl(gpus)
        except ValueError as exc:
            _err(f"error: {exc}")
            raise typer.Exit(USAGE) from None
    who: dict[str, Any] = {}
    if api_key.startswith("fml_j_"):  # a join token: only registers a node, answers nothing else
        if not (node or kubernetes):
            _err("error: a join token can only join a node: add --node (or --kubernetes)")
            raise typer.Exit(USAGE)
    else:
        who = Api(server, api_key).get("/info")["you"]
    if kubernetes:
        _join_pool(api_key, server, name, labels, price, context, namespace, image, foreground)
        return
    if not node:
        from scheduler.contract import paths

        _write_private(paths.credentials_file(), json.dumps({"server": server, "api_key": api_key}))
        _err(f"Logged in to {server} as {who['owner']} ({who['scope']} key). Commands now go there; "
             f"`fedml logout` forgets it.")
        return
    _join(api_key, server, name, labels, gpus, price, address, foreground, run_as, reclaim_orphans)


def _given_key(api_key: str | None, key_fd: int | None) -> str | None:
    """The key: from the pipe `main` re-executed us with (it was a positional argument), $FEDML_API_KEY, a
    prompt on a terminal, or the first line of stdin."""
    if key_fd is not None:
        with os.fdopen(key_fd, "r", errors="replace") as f:
            return f.read(4096).strip() or None
    if api_key:
        return api_key.strip()
    if os.environ.get("FEDML_API_KEY"):
        return os.environ["FEDML_API_KEY"].strip()
    try:
        if sys.stdin.isatty():
            import getpass

            return getpass.getpass("API key or join token: ").strip() or None
        return sys.stdin.readline(4096).strip() or None
    except (OSError, ValueError, EOFError):
        return None


# Options of `fedml login` that take a value: what is not one of them, nor an option, is the positional key.
_LOGIN_VALUED = {"--server", "-s", "--name", "--label", "-l", "--gpus", "--price-per-gpu-hour", "--address",
                 "--context", "--namespace", "--image", "--run-as", "--key-fd", "--version", "-v"}


def reexec_without_key(argv: list[str]) -> None:
    """`fedml login KEY ...`: the key would stay readable in /proc/PID/cmdline (and `ps`) for as long as we run.
    Hand it over through a pipe and exec ourselves again without it. Returns if there is no positional key."""
    args = argv[1:]
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            i += 1
            break
        if a.startswith("-"):
            i += 2 if a in _LOGIN_VALUED else 1
            continue
        break
    if i >= len(args) or args[i].startswith("-"):
        return
    key = args[i].encode(errors="surrogateescape")  # argv may hold any bytes
    if len(key) > 4096:  # a key is ~50 bytes; a longer argument would not fit the pipe's buffer
        sys.stderr.write("error: API_KEY: longer than any API key (4 KiB or more); check what was pasted\n")
        sys.exit(2)
    r, w = os.pipe()
    os.write(w, key)  # far below the pipe's buffer
    os.close(w)
    os.set_inheritable(r, True)
    rest = [*args[:i], *args[i + 1:], "--key-fd", str(r)]
    if "--" in rest:  # options after `--` would be taken as arguments
        rest.remove("--")
    os.execv(sys.executable, [sys.executable, "-m", "fedml_cli.main", argv[0], *rest])


def _hand_over(home: Path, api_key: str) -> Path:
    """The key for the agent, in a 0600 file it deletes once read: never argv, never its environment."""
    path = home / ".join-key"
    _write_private(path, api_key)
    return path


def _join(api_key: str, server: str, name: str | None, labels: dict[str, str], gpus: str | None,
          price: float | None, address: str | None, foreground: bool, run_as: str | None = None,
          reclaim_orphans: bool = False) -> None:
    import socket


    name = name or socket.gethostname()
    home = _free_home(name, "node")
    args = ["--server", server, "--home", str(home), "--name", name]
    if gpus:
        args += ["--gpus", gpus]
    for k, v in labels.items():
        args += ["--label", f"{k}={v}"]
    if price is not None:
        args += ["--price-per-gpu-hour", str(price)]
    if address:
        args += ["--address", address]
    if run_as:
        args += ["--run-as", run_as]
    if reclaim_orphans:
        args.append("--reclaim-orphans")
    pid, info = _start_agent("agents.agent", args, api_key, home, "node.json", "agent", timeout=30,
                             foreground=foreground)
    _err(f"Node {info['name']} joined {server} as {info['id']}; agent pid {pid}, log {home / 'agent.log'}. "
         "`fedml logout` stops it.")


def _start_agent(module: str, args: list[str], api_key: str, home: Path, ready: str, what: str,
                 timeout: float, foreground: bool) -> tuple[int, dict[str, Any]]:
    """Start `python -m module` in the background (its own session, output in home/agent.log) and wait until it
    writes home/`ready` (it joined). Returns its pid and that file's content; exit 3 if it dies or never joins.
    With `foreground`, this process becomes the agent instead. The key goes in a private file, never the env."""
    args = [*args, "--key-file", str(_hand_over(home, api_key))]
    env = {k: v for k, v in os.environ.items() if k not in ("FEDML_API_KEY", "FEDML_ADMIN_KEY")}
    if foreground:
        os.execve(sys.executable, [sys.executable, "-m", module, *args], env)
    (home / ready).unlink(missing_ok=True)
    # 0600: HOME is passable for the job user (0711), and the log names other users' runs
    fd = os.open(home / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (home / ready).exists():
            return proc.pid, json.loads((home / ready).read_text())
        if proc.poll() is not None:
            lines = [ln for ln in (home / "agent.log").read_text(errors="replace").splitlines() if ln.strip()]
            _err(f"error: the {what} exited (code {proc.returncode}): {lines[-1] if lines else 'no output'}")
            raise typer.Exit(UNREACHABLE)
        time.sleep(0.05)
    _err(f"error: the {what} did not {'register' if what == 'agent' else 'join'} within {timeout:.0f} s; "
         f"see {home / 'agent.log'}")
    raise typer.Exit(UNREACHABLE)


def _context_namespace(context: str | None) -> str:
    """The namespace of the kubeconfig context the pool agent will use (the default pool name says it)."""
    try:
        from kubernetes import config  # only on this path: `fedml --help` never imports it

        contexts, active = config.list_kube_config_contexts()
        chosen = next((c for c in contexts if c["name"] == context), None) if context else active
        return str(((chosen or {}).get("context") or {}).get("namespace") or "default")
    except Exception:  # no kubeconfig here: the agent will say so
        return "default"


def _join_pool(api_key: str, server: str, name: str | None, labels: dict[str, str], price: float | None,
               context: str | None, namespace: str | None, image: str | None, foreground: bool) -> None:

    pool = name or f"k8s-{namespace or _context_namespace(context)}"
    home = _free_home(pool, "pool")
    args = ["--server", server, "--home", str(home), "--pool", pool]
    for flag, value in (("--context", context), ("--namespace", namespace), ("--image", image)):
        if value:
            args += [flag, value]
    for k, v in labels.items():
        args += ["--label", f"{k}={v}"]
    if price is not None:
        args += ["--price-per-gpu-hour", str(price)]
    pid, info = _start_agent("agents.k8s_agent", args, api_key, home, "pool.json", "pool agent", timeout=60,
                             foreground=foreground)
    _err(f"Pool {pool} joined {server}: {len(info['nodes'])} Kubernetes node(s), {info['gpus']} GPU(s), "
         f"namespace {info['namespace']}; agent pid {pid}, log {home / 'agent.log'}. `fedml logout` stops it.")


def logout(
    name: Annotated[str | None, typer.Option("--name", help="Only this node (default: every node started from "
                                                            "this FEDML_HOME, and the client credentials).")] = None,
) -> None:
    """Stop the agents `fedml login --node` started here (their runs are stopped and requeued elsewhere per
    their retry policy), remove the nodes from the scheduler, and forget stored credentials."""
    from scheduler.contract import paths

    nodes_dir = paths.home() / "nodes"
    homes = [paths.node_home(name)] if name else (sorted(p for p in nodes_dir.iterdir() if p.is_dir())
                                                   if nodes_dir.exists() else [])
    if name and not homes[0].exists():
        _err(f"error: no node {name} was started from {paths.home()}")
        raise typer.Exit(USAGE)
    for home in homes:
        _leave(home)
    if not name:
        creds = paths.credentials_file()
        if creds.exists():
            creds.unlink()
            _err("Forgot the stored client credentials.")
        elif not homes:
            _err("Not logged in.")


def _leave(home: Path) -> None:
    pid = _agent_pid(home)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    pool = (home / "pool.json").exists()
    # Stopping the jobs and removing the node are the agent's business: run its `leave` as a process.
    try:
        done = subprocess.run([sys.executable, "-m", "agents.leave", str(home)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        for line in done.stderr.splitlines():
            _err(line)
    except subprocess.TimeoutExpired:
        _err(f"warning: leaving {home.name} took over 5 minutes; its jobs may still run")
    import shutil

    shutil.rmtree(home, ignore_errors=True)
    _err(f"{'Pool' if pool else 'Node'} {home.name} logged out" + (f" (agent pid {pid} stopped)." if pid else "."))


__all__ = ["login", "logout", "reexec_without_key"]
