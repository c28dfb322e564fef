"""The serve supervisor: runs an endpoint's replicas on one node and keeps them up.

    python -m runtime.workloads.serve --dir RUN_DIR

The agent starts it as the job of a deploy/serve run (through the process runtime, after the bootstrap), so it
outlives an agent restart like any job and `fedml run stop` stops it like any job. It reads
    RUN_DIR/serve.json      the replica command file, readiness path, replica count, GPUs, stop grace
    RUN_DIR/control.json    {"replicas": N}: written by the agent when the endpoint is scaled
and keeps RUN_DIR/replicas.json (what the agent reports to the scheduler) current; scheduler/contract/supervisor.py
defines the three files for both sides.

Each replica runs `bash -e replica.sh` in its own session with PORT / FEDML_SERVE_PORT set to a port of its own
(kept across restarts, so the gateway's address for it stays valid) and FEDML_REPLICA_INDEX. A replica is ready
once GET readiness_path answers 2xx; three failed probes in a row make it unready. A replica that exits non-zero
or is killed is restarted after a back-off (1 s, 2 s, 4 s ... 30 s; reset after 60 s up). One that exits 0 is
done; when every replica is done the supervisor exits 0 and the run finishes. Its output, and its replicas'
prefixed with "[replica N]", goes to the run's log.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from scheduler.contract import supervisor
from scheduler.contract.supervisor import free_port

BACKOFF_MAX = 30.0
BACKOFF_RESET_AFTER = 60.0
PROBE_EVERY_STARTING = 0.25
PROBE_EVERY_READY = 2.0
PROBE_FAILURES_UNREADY = 3

_out_lock = threading.Lock()


def say(msg: str) -> None:
    with _out_lock:
        sys.stdout.write(f"[serve] {msg}\n")
        sys.stdout.flush()


def _pump(src: IO[bytes], dst: IO[str], prefix: str) -> None:
    for raw in iter(src.readline, b""):
        line = raw.decode("utf-8", "replace")
        with _out_lock:
            dst.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            dst.flush()
    src.close()


def _port_holder(port: int) -> int | None:
    """The pid listening on a TCP port of this machine (None: nobody, or a process we may not look into)."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return int(c.pid)
    return None


class Replica:
    def __init__(self, index: int, port: int) -> None:
        self.index, self.port = index, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.state = "starting"
        self.restarts = 0
        self.last_exit: int | None = None
        self.started_at = 0.0
        self.since = time.time()
        self.restart_at: float | None = None
        self.next_probe = 0.0
        self.probe_failures = 0
        self.message: str | None = None
        self.retiring = False  # scaled away: stopped, then forgotten
        self.pumps: list[threading.Thread] = []

    def drain(self, timeout: float = 2.0) -> None:
        """Wait for the output threads to copy what the replica printed before it exited (its session is
        killed first, so nothing holds the pipes open): 'exited' is never said before its last line."""
        deadline = time.monotonic() + timeout
        for t in self.pumps:
            t.join(max(0.0, deadline - time.monotonic()))
        self.pumps = []

    def set(self, state: str, message: str | None = None) -> None:
        if state != self.state:
            self.state, self.since = state, time.time()
        self.message = message

    def view(self) -> dict[str, Any]:
        return {"index": self.index, "port": self.port, "state": self.state,
                "pid": self.proc.pid if self.proc and self.proc.poll() is None else None,
                "restarts": self.restarts, "last_exit": self.last_exit, "since": self.since,
                "message": self.message}


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        cfg = supervisor.ServeConfig.loads((run_dir / supervisor.CONFIG).read_text())
        self.readiness_path = cfg.readiness_path
        self.gpus = cfg.gpus
        self.grace = cfg.grace
        self.ports: dict[int, int] = {int(k): v for k, v in cfg.ports.items()}
        self.want = cfg.replicas
        host = os.environ.get("FEDML_SERVE_HOST", "127.0.0.1")
        self.host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
        self.replicas: dict[int, Replica] = {}
        self.stopping = False
        self._control_mtime = 0.0
        self._last_written = ""

    # -- replicas -----------------------------------------------------------------------------------------
    def _env(self, r: Replica) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"PORT": str(r.port), "FEDML_SERVE_PORT": str(r.port), "FEDML_REPLICA_INDEX": str(r.index)})
        if self.gpus:  # replicas share the run's GPUs round robin
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[r.index % len(self.gpus)]
        return env

    def _start(self, r: Replica) -> None:
        r.proc = subprocess.Popen(["bash", "-e", str(self.dir / "replica.sh")], env=self._env(r),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        r.pumps = []
        for src, dst in ((r.proc.stdout, sys.stdout), (r.proc.stderr, sys.stderr)):
            assert src is not None
            t = threading.Thread(target=_pump, args=(src, dst, f"[replica {r.index}] "), daemon=True)
            t.start()
            r.pumps.append(t)
        r.started_at = time.monotonic()
        r.restart_at = None
        r.probe_failures = 0
        r.next_probe = time.monotonic() + 0.1
        r.set("starting")
        say(f"replica {r.index} started on port {r.port} (pid {r.proc.pid})")

    def _add(self, index: int) -> None:
        port = self.ports.get(index) or free_port()
        self.ports[index] = port
        r = Replica(index, port)
        self.replicas[index] = r
        self._start(r)

    @staticmethod
    def _signal(r: Replica, sig: int) -> None:
        # The whole group, even when its leader (the replica's bash) is gone: a server it started must not
        # outlive it, keep the port and answer the next replica's readiness probes.
        if r.proc is not None:
            try:
                os.killpg(r.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _retire(self, r: Replica) -> None:
        r.retiring = True
        r.set("stopping", "scaled down")
        self._signal(r, signal.SIGTERM)
        r.restart_at = time.monotonic() + self.grace  # when to SIGKILL if it is still there

    def scale(self) -> None:
        active = sorted(i for i, r in self.replicas.items() if not r.retiring)
        for i in active[self.want:]:
            say(f"scaling down: stopping replica {i}")
            self._retire(self.replicas[i])
        index = 0
        while len([r for r in self.replicas.values() if not r.retiring]) < self.want:
            while index in self.replicas:
                index += 1
            say(f"scaling up: adding replica {index}")
            self._add(index)

    def _exited(self, r: Replica, code: int) -> None:
        assert r.proc is not None
        r.last_exit = code
        if r.retiring or self.stopping:
            return
        if code == 0:
            r.set("exited", "exited with code 0")
            say(f"replica {r.index} exited with code 0; not restarted")
            return
        if time.monotonic() - r.started_at > BACKOFF_RESET_AFTER:
            r.restarts = 0
        delay = min(BACKOFF_MAX, 2.0 ** r.restarts)
        what = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        r.restarts += 1
        r.restart_at = time.monotonic() + delay
        r.set("restarting", f"{what}; restart {r.restarts} in {delay:.0f} s")
        say(f"replica {r.index} {what}; restarting in {delay:.0f} s (restart {r.restarts})")

    def _probe(self, r: Replica) -> None:
        conn = http.client.HTTPConnection(self.host, r.port, timeout=1.0)
        try:
            conn.request("GET", self.readiness_path)
            ok = 200 <= conn.getresponse().status < 300
        except (OSError, http.client.HTTPException):
            ok = False
        finally:
            conn.close()
        if ok and r.state != "ready" and (holder := _port_holder(r.port)) is not None and r.proc is not None:
            try:
                ours = os.getpgid(holder) == r.proc.pid
            except ProcessLookupError:
                ours = False
            if not ours:  # something else answers on the port: this replica is not the one that is ready
                ok = False
                if r.message is None or "held by" not in r.message:
                    say(f"replica {r.index}: port {r.port} is held by pid {holder}, not by this replica")
                r.message = f"port {r.port} is held by pid {holder}"
        if ok:
            r.probe_failures = 0
            if r.state != "ready":
                say(f"replica {r.index} is ready on port {r.port} "
                    f"({time.monotonic() - r.started_at:.1f} s after start)")
                r.set("ready")
        else:
            r.probe_failures += 1
            if r.state == "ready" and r.probe_failures >= PROBE_FAILURES_UNREADY:
                say(f"replica {r.index} is unready: {self.readiness_path} failed {r.probe_failures} times")
                r.set("unready", f"{self.readiness_path} not answering 2xx")
        r.next_probe = time.monotonic() + (PROBE_EVERY_READY if r.state == "ready" else PROBE_EVERY_STARTING)

    def tick(self) -> None:
        now = time.monotonic()
        for i, r in list(self.replicas.items()):
            assert r.proc is not None
            code = r.proc.poll()
            if code is not None and r.state not in ("restarting", "exited"):
                self._signal(r, signal.SIGKILL)  # what the replica left behind in its session
                r.drain()
                if r.retiring:
                    del self.replicas[i]
                    say(f"replica {i} stopped")
                    continue
                self._exited(r, code)
            elif r.retiring and code is None and r.restart_at is not None and now > r.restart_at:
                self._signal(r, signal.SIGKILL)
            elif r.state == "restarting" and r.restart_at is not None and now >= r.restart_at:
                self._start(r)
            elif r.state in ("starting", "ready", "unready") and code is None and now >= r.next_probe:
                self._probe(r)

    # -- files ------------------------------------------------------------------------------------------------
    def read_control(self) -> None:
        f = self.dir / supervisor.CONTROL
        try:
            mtime = f.stat().st_mtime
            if mtime != self._control_mtime:
                self._control_mtime = mtime
                control = supervisor.Control.loads(f.read_text())
                want = control.replicas
                # Ports for new replicas come from the agent: the gateway proxies to no port it did not assign.
                self.ports.update({int(k): v for k, v in control.ports.items() if int(k) not in self.ports})
                if want != self.want:
                    say(f"replicas: {self.want} -> {want}")
                    self.want = want
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
            pass

    def write_state(self) -> None:
        views = [r.view() for _, r in sorted(self.replicas.items())]
        doc = json.dumps({"replicas": views, "want": self.want, "ports": self.ports})
        key = json.dumps([(v["index"], v["state"], v["restarts"], v["pid"]) for v in views] + [self.want])
        if key == self._last_written:
            return
        tmp = self.dir / (supervisor.STATE + ".tmp")
        tmp.write_text(doc)
        os.replace(tmp, self.dir / supervisor.STATE)
        self._last_written = key

    # -- life -------------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.read_control()
        say(f"starting {self.want} replica(s); readiness {self.readiness_path}")
        self.scale()
        while not self.stopping:
            self.read_control()
            self.scale()
            self.tick()
            self.write_state()
            live = [r for r in self.replicas.values() if not r.retiring]
            if live and all(r.state == "exited" for r in live):
                say("every replica exited with code 0; the endpoint is done")
                return 0
            time.sleep(0.05)
        return self.shutdown()

    def shutdown(self) -> int:
        say(f"stopping {len(self.replicas)} replica(s)")
        for r in self.replicas.values():
            r.set("stopping")
            self._signal(r, signal.SIGTERM)
        self.write_state()
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(r.proc and r.proc.poll() is None for r in self.replicas.values()):
            time.sleep(0.05)
        for r in self.replicas.values():
            self._signal(r, signal.SIGKILL)
            r.drain(0.5)
        return 143


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.workloads.serve")
    p.add_argument("--dir", type=Path, required=True, help="the run directory (serve.json, control.json)")
    args = p.parse_args(argv)
    sup = Supervisor(args.dir)

    def on_term(*_: Any) -> None:
        sup.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return sup.run()


if __name__ == "__main__":
    sys.exit(main())
