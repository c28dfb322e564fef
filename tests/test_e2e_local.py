"""End to end through the real `fedml` executable, a real local scheduler and a real agent process."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import ROOT, Fedml, write_job
from .procs import answers, cmdline, free_port, wait_for

HELLO = ROOT / "job_templates" / "hello" / "job.yaml"


def run_json(fedml: Fedml, run_id: str) -> dict:
    r = fedml("run", "status", run_id, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_status(fedml: Fedml, run_id: str, statuses: tuple[str, ...], timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = run_json(fedml, run_id)
        if run["status"] in statuses or time.monotonic() > deadline:
            assert run["status"] in statuses, run
            return run
        time.sleep(0.1)


def run_processes(run_id: str) -> list[psutil.Process]:
    """Processes of ours that carry the run's id in their environment."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDML_CURRENT_RUN_ID") == run_id:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def test_hello_template_streams_in_order_and_exits_0(shared_fedml: Fedml) -> None:
    r = shared_fedml("launch", str(HELLO))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "Bootstrap finished."
    assert lines[1].startswith("current job id: run-")
    run_id = lines[1].split(": ")[1]
    assert lines[3].startswith("Hello from fedml launch")
    assert lines[4:7] == ["step 1/3", "step 2/3", "step 3/3"]
    assert lines[7] == f"done: run {run_id} rank 0"
    assert f"Run {run_id} submitted" in r.stderr
    assert run_json(shared_fedml, run_id)["status"] == "FINISHED"
    # --explain: how placement scored the local node (one feasible node: the one chosen, rank 0)
    explained = shared_fedml("run", "status", run_id, "--explain")
    assert explained.returncode == 0, explained.stderr
    assert "placement: weighted mean of binpack x1, cost x0.25" in explained.stdout
    row = next(line for line in explained.stdout.splitlines() if "1.000" in line)
    assert row.split("│")[2].strip() == "0", explained.stdout


def test_failing_job_exit_code_propagates_and_run_failed(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, 'echo "before"\nexit 7\necho "never printed"')
    r = shared_fedml("launch", str(job), "--json")
    assert r.returncode == 7, r.stderr
    recs = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [x["line"] for x in recs if "line" in x] == ["before"]
    end = recs[-1]
    assert end["end"] and end["status"] == "FAILED" and end["exit_code"] == 7
    run = run_json(shared_fedml, end["run_id"])
    assert run["status"] == "FAILED" and run["exit_code"] == 7
    assert "exited with code 7" in run["reason"]


def test_set_e_semantics_stop_at_first_failing_command(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, "echo one\nfalse\necho two")
    r = shared_fedml("launch", str(job))
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["one"]


def test_bootstrap_failure_fails_run_without_running_job(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, "echo job-ran", extra="bootstrap: |\n  echo booting\n  exit 3\n")
    r = shared_fedml("launch", str(job))
    assert r.returncode == 3
    assert "job-ran" not in r.stdout and "booting" in r.stdout
    assert "bootstrap failed with exit code 3" in r.stderr


def test_detach_then_logs_follow_shows_the_same_lines(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, 'for i in $(seq 1 20); do echo "tick $i"; sleep 0.02; done\necho oops >&2')
    r = shared_fedml("launch", str(job), "--detach")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    assert run_id.startswith("run-")
    f = shared_fedml("logs", "-f", run_id)
    assert f.returncode == 0, f.stderr
    assert f.stdout.splitlines() == [f"tick {i}" for i in range(1, 21)]
    assert "oops" in f.stderr  # stderr lines go to stderr
    again = shared_fedml("logs", run_id, "--json")
    recs = [json.loads(x) for x in again.stdout.splitlines()]
    assert [x["pos"] for x in recs] == list(range(21))
    assert recs[-1]["stream"] == "stderr" and recs[-1]["line"] == "oops"
    tail = shared_fedml("logs", run_id, "--tail", "3")
    assert tail.stdout.splitlines() == ["tick 19", "tick 20"] and "oops" in tail.stderr


def test_fifty_thousand_lines_none_lost_none_duplicated(shared_fedml: Fedml, tmp_path: Path) -> None:
    n = 50_000
    job = write_job(tmp_path, f"python3 -c \"import sys\nfor i in range({n}): print(f'line {{i}} ' + 'x' * (i % 50))\"")
    r = shared_fedml("launch", str(job), "--detach")
    run_id = r.stdout.strip()
    follow = shared_fedml("logs", "-f", run_id, timeout=180)
    assert follow.returncode == 0, follow.stderr
    expected = [f"line {i} " + "x" * (i % 50) for i in range(n)]
    assert follow.stdout.splitlines() == expected
    after = shared_fedml("logs", run_id, timeout=180)
    assert after.stdout.splitlines() == expected
    assert run_json(shared_fedml, run_id)["log_count"] == n


def test_env_vars_substitution_and_free_keys(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "echo \"rank=$FEDML_CLIENT_RANK nodes=$FEDML_NUM_NODES world=$WORLD_SIZE\"\n"
        "echo 'literal=$FEDML_CURRENT_RUN_ID'\n"
        "echo \"ds=$FEDML_ENV_DATA_ARGS_DATASET_NAME lr=$FEDML_ENV_TRAINING_PARAMS_LEARNING_RATE\"\n"
        "echo \"mine=$MY_VAR extra=$EXTRA cvd=[$CUDA_VISIBLE_DEVICES]\"",
        extra="data_args:\n  dataset_name: mnist\ntraining_params:\n  learning_rate: 0.004\nenvs:\n  MY_VAR: 42\n")
    r = shared_fedml("launch", str(job), "--json", "--env", "EXTRA=hello world")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in r.stdout.splitlines()]
    run_id = recs[-1]["run_id"]
    lines = [x["line"] for x in recs if "line" in x]
    assert lines == [
        "rank=0 nodes=1 world=1",
        f"literal={run_id}",  # substituted in the job text, as FedML does, even inside single quotes
        "ds=mnist lr=0.004",
        "mine=42 extra=hello world cvd=[]",
    ]


def test_workspace_files_and_gitignore(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, "ls -a | sort\ncat data/x.txt", workspace={
        "data/x.txt": "payload", ".gitignore": "*.ckpt\nbig/\n", "model.ckpt": "nope", "big/a": "nope",
        "run.sh": "echo hi"})
    r = shared_fedml("launch", str(job))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [".", "..", ".gitignore", "data", "run.sh", "payload"]


def test_stop_kills_the_whole_process_tree(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, "sleep 1000 &\nsleep 1000 &\n(setsid sleep 1000 &)\necho started\nsleep 1000")
    r = shared_fedml("launch", str(job), "--detach")
    run_id = r.stdout.strip()
    wait_status(shared_fedml, run_id, ("RUNNING",))
    deadline = time.monotonic() + 10
    while len(run_processes(run_id)) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(run_processes(run_id)) >= 4  # bash + three sleeps at least
    s = shared_fedml("run", "stop", run_id)
    assert s.returncode == 0, s.stderr
    assert "KILLED" in s.stderr
    run = run_json(shared_fedml, run_id)
    assert run["status"] == "KILLED"
    alive = [p for p in run_processes(run_id) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    logs = shared_fedml("logs", run_id)
    assert logs.stdout.splitlines() == ["started"]


def test_stop_of_a_queued_or_finished_run(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, "echo quick")
    r = shared_fedml("launch", str(job))
    run_id = r.stderr.split("Run ")[1].split()[0]
    s = shared_fedml("run", "stop", run_id)
    assert s.returncode == 0 and "FINISHED" in s.stderr  # nothing to stop: says what it is


def test_run_list_and_status_filters(shared_fedml: Fedml, tmp_path: Path) -> None:
    ok = shared_fedml("launch", str(write_job(tmp_path / "a", "echo a")), "--detach").stdout.strip()
    bad = shared_fedml("launch", str(write_job(tmp_path / "b", "exit 5")), "--detach").stdout.strip()
    wait_status(shared_fedml, ok, ("FINISHED",))
    wait_status(shared_fedml, bad, ("FAILED",))
    failed = json.loads(shared_fedml("run", "list", "--status", "failed", "--json").stdout)
    assert bad in [r["id"] for r in failed] and ok not in [r["id"] for r in failed]
    table = shared_fedml("run", "list")
    assert ok in table.stdout and bad in table.stdout
    assert shared_fedml("run", "list", "--status", "nope").returncode == 2


def test_missing_run_exit_4_and_unreachable_exit_3(shared_fedml: Fedml) -> None:
    r = shared_fedml("run", "status", "run-doesnotexist")
    assert r.returncode == 4 and "not found" in r.stderr
    assert shared_fedml("logs", "run-doesnotexist").returncode == 4
    down = shared_fedml("run", "list", env={"FEDML_SERVER": "http://127.0.0.1:9"})
    assert down.returncode == 3 and "cannot reach the scheduler" in down.stderr


def test_job_that_can_never_fit_is_rejected_at_launch(shared_fedml: Fedml, tmp_path: Path) -> None:
    shared_fedml("launch", str(HELLO))  # make sure the local agent has registered
    job = write_job(tmp_path, "echo hi", extra="computing:\n  minimum_num_gpus: 8\n  resource_type: H100-80G\n")
    r = shared_fedml("launch", str(job))
    assert r.returncode == 2
    assert "cannot ever run" in r.stderr and "8 free H100-80G GPUs" in r.stderr


def test_scheduler_started_once_reused_and_restarted_after_sigkill(fedml: Fedml, tmp_path: Path) -> None:
    first = fedml("launch", str(HELLO))
    assert first.returncode == 0, first.stderr
    assert "Started the local scheduler" in first.stderr
    state = json.loads((fedml.home / "local" / "scheduler.json").read_text())
    second = fedml("launch", str(HELLO))
    assert second.returncode == 0 and "Started the local scheduler" not in second.stderr
    assert json.loads((fedml.home / "local" / "scheduler.json").read_text())["pid"] == state["pid"]
    before = json.loads(fedml("run", "list", "--json").stdout)
    assert len(before) == 2

    os.kill(state["pid"], signal.SIGKILL)
    after = fedml("run", "list", "--json")
    assert after.returncode == 0, after.stderr
    assert "Started the local scheduler" in after.stderr
    assert [(r["id"], r["status"]) for r in json.loads(after.stdout)] == [(r["id"], r["status"]) for r in before]
    new_pid = json.loads((fedml.home / "local" / "scheduler.json").read_text())["pid"]
    assert new_pid != state["pid"]
    # and it still runs jobs (the surviving agent found the new scheduler)
    third = fedml("launch", str(HELLO))
    assert third.returncode == 0, third.stderr


def test_run_survives_scheduler_and_agent_sigkill_without_losing_lines(fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, 'for i in $(seq 1 60); do echo "n $i"; sleep 0.05; done')
    run_id = fedml("launch", str(job), "--detach").stdout.strip()
    wait_status(fedml, run_id, ("RUNNING",))
    time.sleep(0.5)
    local = fedml.home / "local"
    sched_pid = json.loads((local / "scheduler.json").read_text())["pid"]
    agent_pid = int((local / "agent" / "agent.pid").read_text())
    os.kill(agent_pid, signal.SIGKILL)
    os.kill(sched_pid, signal.SIGKILL)
    time.sleep(0.5)
    f = fedml("logs", "-f", run_id, timeout=60)  # restarts the scheduler; it restarts the agent
    assert f.returncode == 0, f.stderr
    assert f.stdout.splitlines() == [f"n {i}" for i in range(1, 61)]
    assert run_json(fedml, run_id)["status"] == "FINISHED"


def test_scheduler_stop_leaves_running_jobs_running_past_the_lease(fedml: Fedml, tmp_path: Path) -> None:
    """`fedml scheduler stop` stops the scheduler and its agent, not the jobs: the lease the jobs' guards watch is
    parked (no scheduler is left to write the node off), and the next command's scheduler re-attaches."""
    go = tmp_path / "go"
    env = {"FEDML_HEARTBEAT_INTERVAL": "1"}  # a lease of 2 s
    job = write_job(tmp_path, f'echo started\nwhile [ ! -e "{go}" ]; do sleep 0.1; done\necho done')
    run_id = fedml("launch", str(job), "--detach", env=env).stdout.strip()
    try:
        wait_status(fedml, run_id, ("RUNNING",))
        s = fedml("scheduler", "stop")
        assert "stopped agent" in s.stderr, s.stderr
        # (cmdline(): the loop's `sleep 0.1` children come and go while they are listed)
        shells = [p for p in run_processes(run_id)
                  if any(a.endswith(("wrapper.sh", "job.sh")) for a in cmdline(p).split())]
        assert len(shells) == 2, shells
        from runtime import fence

        until, _ = fence.read(fedml.home / "local" / "agent" / "lease")
        assert until - fence.now() > 86400, "the lease was not parked"
        time.sleep(5)  # 2.5 leases: a lease left to run out would have had the job killed by now
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in shells)
    finally:
        go.touch()  # (also when this failed: with its lease parked, nothing else would ever end the job)
    f = fedml("logs", "-f", run_id, env=env, timeout=60)  # starts the scheduler again; it restarts the agent
    assert f.returncode == 0, f.stderr
    assert f.stdout.splitlines() == ["started", "done"]
    assert run_json(fedml, run_id)["status"] == "FINISHED"


def test_scheduler_stop_then_next_command_starts_a_new_one(fedml: Fedml) -> None:
    assert fedml("launch", str(HELLO)).returncode == 0
    s = fedml("scheduler", "stop")
    assert "stopped scheduler" in s.stderr and "stopped agent" in s.stderr
    assert not (fedml.home / "local" / "scheduler.json").exists()
    assert fedml("scheduler", "status").returncode == 3
    r = fedml("run", "list", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 1


@pytest.mark.parametrize("cmd", [["version"], ["--help"], ["env"]])
def test_light_commands_work_without_a_scheduler(fedml: Fedml, cmd: list[str]) -> None:
    r = fedml(*cmd)
    assert r.returncode == 0, r.stderr
    assert not (fedml.home / "local" / "scheduler.json").exists()


def test_ctrl_c_stops_following_but_not_the_run(shared_fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, 'echo first\nsleep 2\necho second')
    p = shared_fedml.popen("launch", str(job))
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "first"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130
    run_id = err.split("Run ")[1].split()[0]
    assert f"Run {run_id} keeps running" in err
    run = wait_status(shared_fedml, run_id, ("FINISHED",), timeout=30)
    assert run["exit_code"] == 0
    assert shared_fedml("logs", run_id).stdout.splitlines() == ["first", "second"]


def test_foreground_scheduler_is_used_and_cleans_up(fedml: Fedml, tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"  # README: `scheduler start --store/--blob-dir/--log-retention-lines`
    p = fedml.popen("scheduler", "start", "--port", "0", "--store", "sqlite", "--blob-dir", str(blobs),
                    "--log-retention-lines", "1000")
    try:
        state = fedml.home / "local" / "scheduler.json"
        deadline = time.monotonic() + 20
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = json.loads(state.read_text())["pid"]
        assert pid == p.pid
        r = fedml("launch", str(write_job(tmp_path, "cat a.txt", workspace={"a.txt": "via foreground\n"})))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "via foreground"
        assert [f for f in blobs.rglob("*") if f.is_file()], "the workspace was not stored in --blob-dir"
        st = json.loads(fedml("scheduler", "status", "--json").stdout)
        assert st["running"] and st["kind"] == "local" and st["store"] == "SQLiteStore", st
        assert "Started the local scheduler" not in r.stderr
        again = fedml("scheduler", "start", "--port", "0")
        assert again.returncode == 2 and "already running" in again.stderr
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    assert not state.exists()


def test_a_starting_scheduler_refuses_connections_until_it_serves(tmp_path: Path) -> None:
    """A replica behind a balancer must not accept what it cannot answer yet: one that listened while it built
    its app held the agents' polls in its backlog for seconds on a loaded machine, their leases ran out and
    their jobs were fenced although the other replica was up. Frozen (SIGSTOP) while it starts, it refuses
    connections; let go, it answers, and only then writes its address for the CLI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
    for attempt in range(5):
        port, home = free_port(), tmp_path / f"home{attempt}"
        p = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--home", str(home), "--port", str(port),
                              "--no-agent", "--quiet"], env={**env, "FEDML_HOME": str(home)}, cwd=ROOT,
                             stdin=subprocess.DEVNULL)
        try:
            # Its admin token is written just before it binds its port and builds its app (scheduler/server.py).
            deadline = time.monotonic() + 30
            while not (home / "local" / "token").exists():
                assert p.poll() is None and time.monotonic() < deadline, "the scheduler never wrote its token"
                time.sleep(0.002)
            p.send_signal(signal.SIGSTOP)
            try:
                if (home / "local" / "scheduler.json").exists():
                    continue  # this test was too slow to catch it starting (a loaded machine): again
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", port), timeout=5).close()
            finally:
                p.send_signal(signal.SIGCONT)
            wait_for("the scheduler to answer", functools.partial(answers, f"http://127.0.0.1:{port}"), timeout=30,
                     every=0.05)
            assert json.loads((home / "local" / "scheduler.json").read_text())["url"] == f"http://127.0.0.1:{port}"
            return
        finally:
            p.terminate()
            p.wait(timeout=30)
    pytest.fail("5 tries, and each time the scheduler was serving before the test could stop it")


def test_output_with_unicode_separators_progress_bars_and_binary_is_shown_whole(shared_fedml: Fedml,
                                                                             tmp_path: Path) -> None:
    """U+2028, U+0085 and "\\r" inside a line are data, not record separators (the CLI once split NDJSON with
    str.splitlines and crashed); "\\r" redraws (tqdm) are lines of their own; a 100 KB line is one line, marked."""
    script = ("printf 'a\\xe2\\x80\\xa8b c\\xc2\\x85d\\n'\n"
              "printf 'bar 1\\rbar 2\\rbar 3\\n'\n"
              "head -c 200000 /dev/urandom | tr -d '\\n\\r' | head -c 100000; echo\n"
              "echo after")
    job = write_job(tmp_path, script)
    r = shared_fedml("launch", str(job), "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(ln) for ln in r.stdout.split("\n") if ln.strip()]
    lines = [x["line"] for x in recs if "line" in x]
    assert lines[0] == "a\u2028b c\u0085d"
    assert lines[1:4] == ["bar 1", "bar 2", "bar 3"]
    assert lines[4].endswith("[fedml: line truncated at 64 KiB]") and lines[5:] == ["after"], lines[5:]
    run_id = recs[-1]["run_id"]
    plain = shared_fedml("logs", run_id)
    assert plain.returncode == 0 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stdout.split("\n")[0] == "a\u2028b c\u0085d"
    listed = json.loads(shared_fedml("run", "list", "--json").stdout)
    assert next(x for x in listed if x["id"] == run_id)["log_count"] == run_json(shared_fedml, run_id)["log_count"] == 6


def test_an_unterminated_line_is_shown_while_the_job_runs(shared_fedml: Fedml, tmp_path: Path, shared_tmp: Path) -> None:
    """A progress bar or prompt without a newline reaches a follower within a second, not at the next newline."""
    go = shared_tmp / "go"
    job = write_job(tmp_path, f"printf 'downloading... 42%%'\nwhile [ ! -e {go} ]; do sleep 0.1; done\necho done")
    r = shared_fedml("launch", str(job), "--detach")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        got = [x["line"] for x in map(json.loads, shared_fedml("logs", run_id, "--json").stdout.split("\n")[:-1])
               if "line" in x]
        if got:
            break
        time.sleep(0.2)
    go.touch()
    assert got == ["downloading... 42%"], got
    wait_status(shared_fedml, run_id, ("FINISHED",))


def test_jobs_run_the_agents_interpreter_first_on_path(shared_fedml: Fedml, tmp_path: Path) -> None:
    """The README's `.venv/bin/fedml launch job_templates/train/job.yaml` from a shell without the venv: the
    job's `python3` is the one fedml runs on (with torch), not the system's."""
    job = write_job(tmp_path, 'python3 -c "import sys; print(sys.prefix)"\necho "PATH=$PATH"')
    r = shared_fedml("launch", str(job), env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    prefix, path = r.stdout.splitlines()
    assert prefix == sys.prefix, (prefix, sys.prefix)
    assert path.split("=", 1)[1].split(":")[0] == os.path.dirname(sys.executable), path
    # a job's own PATH still wins
    own = write_job(tmp_path / "own", 'echo "$PATH"', extra="envs:\n  PATH: /opt/x:/usr/bin:/bin\n")
    assert shared_fedml("launch", str(own)).stdout.strip() == "/opt/x:/usr/bin:/bin"


def _on_a_terminal(fedml: Fedml, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """Run `fedml ARGS` with a pseudo-terminal as its stdin/stdout/stderr; (exit code, what it drew)."""
    import pty
    import subprocess

    from .conftest import FEDML

    master, slave = pty.openpty()
    p = subprocess.Popen([FEDML, *args], stdin=slave, stdout=slave, stderr=slave, env=fedml.env(env))
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=10), out.decode(errors="replace")


def test_long_work_shows_progress_on_a_terminal_only(shared_fedml: Fedml, tmp_path: Path) -> None:
    """A workspace upload, an artifact download and `template init` draw a bar on a terminal (after
    FEDML_PROGRESS_AFTER seconds, 1 by default); with --json or off a terminal nothing extra is printed."""
    ws = {f"f{i}.bin": os.urandom(1 << 20).hex() for i in range(4)}
    job = write_job(tmp_path, 'cp f0.bin "$FEDML_ARTIFACT_DIR/"; echo packed', workspace=ws)
    code, drawn = _on_a_terminal(shared_fedml, "launch", str(job), env={"FEDML_PROGRESS_AFTER": "0"})
    assert code == 0, drawn
    assert "uploading the workspace" in drawn and "packing" in drawn, drawn
    assert "packed" in drawn
    run_id = drawn.split("Run ")[1].split()[0]
    code, drawn = _on_a_terminal(shared_fedml, "run", "artifacts", run_id, "--download", str(tmp_path / "dl"),
                                 env={"FEDML_PROGRESS_AFTER": "0"})
    assert code == 0 and "downloading artifacts of rank 0" in drawn, drawn
    assert (tmp_path / "dl" / "f0.bin").read_text() == ws["f0.bin"]
    code, drawn = _on_a_terminal(shared_fedml, "template", "init", "hello", str(tmp_path / "tpl"),
                                 env={"FEDML_PROGRESS_AFTER": "0"})
    assert code == 0 and "copying template hello" in drawn and (tmp_path / "tpl" / "job.yaml").is_file(), drawn
    code, drawn = _on_a_terminal(shared_fedml, "launch", str(job), "--json", env={"FEDML_PROGRESS_AFTER": "0"})
    assert code == 0 and "uploading" not in drawn and "packing" not in drawn, drawn
    off = shared_fedml("launch", str(job), env={"FEDML_PROGRESS_AFTER": "0"})  # pipes, not a terminal
    assert off.returncode == 0 and off.stdout == "packed\n" and "uploading" not in off.stderr, off.stderr


def test_shell_completion(shared_fedml: Fedml) -> None:
    import subprocess

    from .conftest import FEDML

    # typer finds the shell from the process tree: ask from bash (a second command keeps bash from exec-ing)
    r = subprocess.run(["bash", "-c", f"{FEDML} --show-completion; exit $?"], capture_output=True, text=True, timeout=60,
                       env=shared_fedml.env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "_fedml_completion" in r.stdout, r.stderr
    done = shared_fedml(env={"COMP_WORDS": "fedml ru", "COMP_CWORD": "1", "_FEDML_COMPLETE": "complete_bash"})
    assert done.returncode == 0 and done.stdout.split() == ["run"], done.stdout
