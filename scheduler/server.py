"""Run the scheduler: `python -m scheduler.server` (the embedded default) or `fedml scheduler start`.

Binds its socket before it announces itself, so the address in the state file always answers; with
--agent it also starts the local agent (a separate process that outlives a crash of this one).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .contract import __version__, paths
from .store import DEFAULT_LOG_RETENTION, Store
from .webhooks import parse_allow


def write_secret(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)


def admin_key(store: Store, token_path: Path) -> str | None:
    """Make sure an admin key exists and the local CLI holds one (local/token, mode 0600).
    Returns the secret when it was created now (to show it once), else None."""
    from . import auth
    from .contract.models import ApiKey

    env = os.environ.get("FEDML_ADMIN_KEY")
    if env and auth.verify(store, env) is None:  # deployments (Kubernetes secret, systemd) set it from outside
        store.put_key(ApiKey(id="key-env-admin", name="admin (FEDML_ADMIN_KEY)", scope="admin", owner="admin",
                             hash=auth.digest(env), prefix=env[:10]))
    new = auth.bootstrap_admin(store)
    if new:
        write_secret(token_path, new)
        return new
    try:
        held = token_path.read_text().strip()
    except OSError:
        held = ""
    who = auth.verify(store, held) if held else None
    if who is None or not who.admin:
        _, secret = auth.issue(store, name="local cli", scope="admin", owner="admin")
        write_secret(token_path, secret)
    return None


def spawn_agent(local: Path, store: Store, gpus: str | None = None, run_as: str = "auto") -> subprocess.Popen[bytes]:
    """Start the local agent detached. It holds a lock on its home: if one is already running (it survived
    a crash of an earlier scheduler), this one exits at once and the old one carries on.

    It joins with a single-use join token handed over in a 0600 file that it deletes once read: never the admin
    key, never by argv or environment (a job could read either from /proc)."""
    from . import auth

    log = open(local / "agent.log", "ab")  # noqa: SIM115 - handed to the child
    cmd = [sys.executable, "-m", "agents.agent", "--home", str(local / "agent"),
           "--state-file", str(paths.state_file(local.parent)),
           "--name", f"{socket.gethostname()}-local", "--run-as", run_as]
    if not (local / "agent" / "node_token").exists():  # it has joined before: its node key is all it needs
        _, secret = auth.issue_join(store, creator="admin", ttl=600, uses=1, name="local agent")
        key_file = local / f"agent-join-{os.getpid()}"
        write_secret(key_file, secret)
        cmd += ["--key-file", str(key_file)]
    if gpus:
        cmd += ["--gpus", gpus]
    env = {k: v for k, v in os.environ.items() if k not in ("FEDML_API_KEY", "FEDML_ADMIN_KEY")}
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                            close_fds=True, env=env)


def agent_pid(local: Path) -> int | None:
    try:
        return int((local / "agent" / "agent.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Is `pid` a live agent process (not just any process that reused the number)?"""
    try:
        return b"agents.agent" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def open_store(spec: str, local: Path, log_retention: int | None = None) -> Store:
    """`sqlite` (the state directory's database) or a redis:// URL. RuntimeError/ValueError say why not."""
    if spec == "sqlite":
        from .sqlite_store import SQLiteStore

        return SQLiteStore(local / "scheduler.db", log_retention=log_retention or DEFAULT_LOG_RETENTION)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        import redis

        from .redis_store import RedisStore

        try:
            return RedisStore(spec, log_retention=log_retention or DEFAULT_LOG_RETENTION)
        except redis.RedisError as exc:
            raise RuntimeError(f"cannot use the store {spec}: {exc}") from None
    raise ValueError(f"--store: {spec!r} is neither sqlite nor a redis:// URL")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedml-scheduler", description="fedml launch scheduler")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--home", type=Path, default=None, help="state directory (default: user data dir)")
    p.add_argument("--agent", action=argparse.BooleanOptionalAction, default=None,
                   help="also run a local agent on this machine (default: only when listening on loopback)")
    p.add_argument("--run-as", default=os.environ.get("FEDML_RUN_AS", "auto"),
                   help="user the local agent runs jobs as (auto: fedml-job when root; see `fedml login --run-as`)")
    p.add_argument("--gpus", default=os.environ.get("FEDML_LOCAL_GPUS"),
                   help="GPUs the local agent declares when NVML is absent, e.g. A100-80G:2")
    p.add_argument("--store", default=os.environ.get("FEDML_STORE", "sqlite"),
                   help="sqlite (a database in the state directory) or redis://HOST:6379/0[?prefix=P]: several "
                        "replicas may share one Redis, each with its own --home and one shared --blob-dir")
    p.add_argument("--blob-dir", type=Path, default=os.environ.get("FEDML_BLOB_DIR") or None,
                   help="where uploaded workspaces and artifacts live (default: in the state directory); "
                        "replicas on one Redis must share it")
    p.add_argument("--log-retention-lines", type=int, default=None,
                   help="log lines kept per run (the newest; default 1,000,000)")
    p.add_argument("--max-workspace-mb", type=int, default=512)
    p.add_argument("--heartbeat-interval", type=float, default=float(os.environ.get("FEDML_HEARTBEAT_INTERVAL", "10")),
                   help="seconds; a node silent for 3 intervals is offline")
    p.add_argument("--webhook-allow", default=os.environ.get("FEDML_WEBHOOK_ALLOW", ""),
                   help="networks besides public addresses that jobs' webhooks may reach (CIDR,CIDR)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    # The cyclic collector's young generation collected every 50,000 allocations, not every 700: at each pass
    # the objects of every request in flight are alive, and moved to an older generation, from which they were
    # freed (by reference counting) a moment later, unseen. That churn alone triggered a full pass (~0.3 s at
    # 10,000 nodes here, the event loop held) every few seconds at 1,000 heartbeats/s; now about once a minute
    # (bench/heartbeat.py --gpus 8). A young pass walks at most 50,000 objects.
    gc.set_threshold(50_000, 20, 10)  # (the in-process benches set the same: bench/_common.py)
    try:
        allow = parse_allow(args.webhook_allow)
    except ValueError as exc:
        p.error(f"--webhook-allow: {exc}")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s")
    os.umask(0o077)  # the database, blobs and logs hold runs' secrets: ours alone
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if args.agent is None:
        # A team head (listening beyond loopback) runs other people's jobs only where an admin chose to.
        args.agent = loopback
    base = args.home or paths.home()
    local = paths.local_dir(base)
    local.mkdir(parents=True, exist_ok=True)
    os.chmod(local, 0o700)
    import fcntl

    lock = open(local / "scheduler.lock", "a")  # noqa: SIM115 - held for the life of the process
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fedml scheduler: another scheduler already serves {local}", file=sys.stderr)
        return 2
    from .app import Settings, create_app

    try:
        store = open_store(args.store, local, args.log_retention_lines)
    except (RuntimeError, ValueError) as exc:
        print(f"fedml scheduler: {exc}", file=sys.stderr)
        return 2
    new_admin = admin_key(store, paths.token_file(base))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    def cannot_listen(exc: OSError) -> int:
        print(f"fedml scheduler: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 3

    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        return cannot_listen(exc)
    port = sock.getsockname()[1]
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else ("[::1]" if args.host == "::" else args.host)
    url = f"http://{shown_host}:{port}"
    app = create_app(store, Settings(blob_dir=args.blob_dir or local / "blobs", max_workspace_mb=args.max_workspace_mb,
                                     heartbeat_interval=args.heartbeat_interval, listen=(args.host, port),
                                     webhook_allow=allow))
    state = paths.state_file(base)
    agent: subprocess.Popen[bytes] | None = None
    stopping = False

    def announce() -> None:
        """The app serves: write the address where the CLI finds it, start the local agent, say so."""
        nonlocal agent
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"url": url, "pid": os.getpid(), "started_at": time.time(),
                                   "version": __version__}))
        os.replace(tmp, state)
        agent = spawn_agent(local, store, args.gpus, args.run_as) if args.agent else None
        if not args.quiet:
            print(f"fedml scheduler {__version__} listening on {url} (state in {local})"
                  + ("" if agent else "; no local agent (--agent runs one)"), file=sys.stderr, flush=True)
            if new_admin:
                # The key itself goes to a terminal only: stderr redirected to a log file must not keep it.
                shown = (f"Admin API key (shown once; also saved to {paths.token_file(base)}, mode 0600):\n"
                         f"    {new_admin}" if sys.stderr.isatty()
                         else f"Admin API key saved to {paths.token_file(base)} (mode 0600)")
                print(f"{shown}\n"
                      f"Join a node:     fedml scheduler token create --node   (prints a join token), then on the node:\n"
                      f"                 fedml login --server http://<this host>:{port} --node   (reads the token from "
                      f"stdin)\nMore keys:       fedml scheduler key create NAME", file=sys.stderr, flush=True)
        if agent is not None:
            import threading

            threading.Thread(target=supervise, name="agent-supervisor", daemon=True).start()

    def supervise() -> None:
        # The local agent is a separate process; if it dies, start it again (it re-attaches to its jobs).
        nonlocal agent
        while not stopping:
            time.sleep(2.0)
            pid = agent_pid(local)
            if stopping or agent is None or agent.poll() is None or (pid and _alive(pid)):
                continue
            logging.getLogger("fedml.scheduler").warning("local agent is not running; starting it again")
            agent = spawn_agent(local, store, args.gpus, args.run_as)

    import uvicorn

    class Server(uvicorn.Server):
        # The socket is bound (a process listening there already failed that) but listens only once the app serves:
        # uvicorn listens on it after the app's startup. A replica that accepted connections while it was still
        # starting (seconds on a loaded machine) held what a balancer sent it in its backlog: agents' polls timed
        # out there, their leases ran out and their jobs were fenced although the other replica was up. Refused,
        # the balancer takes the next replica at once. The address is announced then too, so it always answers.
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets=sockets)
            except OSError as exc:  # another process bound the port too (SO_REUSEADDR) and listened first
                sys.exit(cannot_listen(exc))
            if not self.should_exit:
                announce()

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1,
                            timeout_keep_alive=30)
    server = Server(config)

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found: make that
    # handler an exit that runs the clean-up below instead of dying on the spot.
    signal.signal(signal.SIGTERM, leave)
    try:
        server.run(sockets=[sock])
    finally:
        stopping = True
        try:
            if json.loads(state.read_text()).get("pid") == os.getpid():
                state.unlink()
        except (OSError, ValueError):
            pass
        if agent is not None:
            pid = agent_pid(local)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
