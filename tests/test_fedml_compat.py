"""FedML's Python API (`import fedml; fedml.api...`) and its CLI flags (`fedml run logs -rid ...`), end to end:
real `python` processes running scripts written in FedML's style, the real `fedml` command, a real local
scheduler and agent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from .conftest import ROOT, Fedml, write_job

FEDML_STYLE = textwrap.dedent('''
    import sys, time
    import fedml
    from fedml.api.constants import RunStatus

    fedml.set_env_version("release")  # what FedML's scripts do first: accepted, no effect
    error_code, error_msg = fedml.api.fedml_login()
    if error_code != 0:
        raise SystemExit(f"login: {error_msg}")
    launch_result = fedml.api.launch_job(sys.argv[1])
    if launch_result.result_code != 0:
        raise SystemExit(f"Failed to launch job. Reason: {launch_result.result_message}")
    run_id = launch_result.run_id
    deadline = time.time() + 60
    while True:
        run_list, status = fedml.api.run_status(run_id=run_id)
        if status in (RunStatus.FINISHED, RunStatus.FAILED, RunStatus.KILLED) or time.time() > deadline:
            break
        time.sleep(0.1)
    log_result = fedml.api.run_logs(run_id, 1, 2)
    all_logs = fedml.api.run_logs(run_id, need_all_logs=True)
    print(json.dumps({"run_id": run_id, "status": str(status), "name": run_list.run_list[0].run_name,
                      "page": log_result.log_line_list, "total": log_result.total_log_lines,
                      "pages": log_result.total_log_pages, "all": all_logs.log_line_list,
                      "by_name": str(fedml.api.run_status(run_name=run_list.run_list[0].run_name)[1])}))
''').replace("import sys, time", "import json, sys, time")

STOPPING = textwrap.dedent('''
    import json, sys, time
    import fedml
    from fedml.api.constants import RunStatus

    r = fedml.api.launch_job(sys.argv[1])
    assert r.result_code == 0, r.result_message
    while fedml.api.run_status(run_id=r.run_id)[1] != RunStatus.RUNNING:
        time.sleep(0.1)
    stopped = fedml.api.run_stop(r.run_id)
    while fedml.api.run_status(run_id=r.run_id)[1] not in (RunStatus.KILLED, RunStatus.FAILED, RunStatus.FINISHED):
        time.sleep(0.1)
    bad = fedml.api.launch_job(sys.argv[2])
    missing = fedml.api.run_status(run_id="run-0000000000000000")
    try:
        fedml.api.model_push("m")
        unsupported = "no error"
    except NotImplementedError as exc:
        unsupported = str(exc)
    print(json.dumps({"stopped": stopped, "status": str(fedml.api.run_status(run_id=r.run_id)[1]),
                      "bad_code": bad.result_code, "bad_message": bad.result_message, "bad_run": bad.run_id,
                      "missing": list(missing), "unsupported": unsupported}))
''')


def script(fedml: Fedml, tmp_path: Path, text: str, *args: str) -> dict:
    path = tmp_path / "fedml_script.py"
    path.write_text(text)
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=180,
                       env=fedml.env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_script_in_fedmls_style_launches_polls_reads_logs(fedml: Fedml, tmp_path: Path) -> None:
    job = write_job(tmp_path, "for i in 1 2 3 4 5; do echo line $i; done", extra="job_name: compat-hello\n")
    got = script(fedml, tmp_path, FEDML_STYLE, str(job))
    assert got["status"] == "FINISHED" and got["name"] == "compat-hello" and got["by_name"] == "FINISHED"
    lines = [x for x in got["all"] if x.startswith("line ")]
    assert lines == [f"line {i}" for i in range(1, 6)]
    assert got["page"] == got["all"][:2] and got["total"] == len(got["all"]) and got["pages"] == -(-got["total"] // 2)


def test_fedml_api_stops_runs_and_says_what_failed(fedml: Fedml, tmp_path: Path) -> None:
    sleeper = write_job(tmp_path / "a", "echo started; sleep 60")
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: echo hi\ncomputing:\n  minimum_num_gpus: many\n")
    got = script(fedml, tmp_path, STOPPING, str(sleeper), str(bad))
    assert got["stopped"] is True and got["status"] == "KILLED"
    assert got["bad_code"] == 2 and got["bad_run"] is None
    assert "bad.yaml:3" in got["bad_message"] and "minimum_num_gpus" in got["bad_message"]
    assert got["missing"] == [None, None]
    assert "model_push" in got["unsupported"] and "model_deploy" in got["unsupported"]


def test_fedml_import_is_light() -> None:
    """`import fedml` and `fedml.api` load neither torch nor the server (FedML's import took 15-20 s here)."""
    code = ("import sys, fedml, fedml.api; heavy = [m for m in ('torch', 'fastapi', 'uvicorn', 'docker', "
            "'kubernetes', 'scheduler.service', 'typer', 'rich') if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_fedmls_cli_flags_name_runs(fedml: Fedml, tmp_path: Path) -> None:
    """`fedml run logs -rid RUN` (what FedML prints after a launch), `run status -rid / -r NAME`, `run list -r`,
    paging with -pn/-ps, `run stop -rid`, `launch -k KEY`: accepted beside our own forms."""
    version = fedml("--version")
    assert version.returncode == 0 and version.stdout.startswith("fedml launch ")
    job = write_job(tmp_path, "for i in 1 2 3 4 5 6 7; do echo l$i; done", extra="job_name: flags\n")
    r = fedml("launch", "-k", "not-needed-for-the-local-scheduler", str(job), "--detach")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    r = fedml("run", "logs", "-rid", run_id, "-f")
    assert r.returncode == 0 and [x for x in r.stdout.splitlines() if x.startswith("l")] == [f"l{i}" for i in range(1, 8)]
    paged = fedml("run", "logs", "-rid", run_id, "-pn", "2", "-ps", "3")
    everything = fedml("logs", run_id)
    assert paged.returncode == 0 and paged.stdout.splitlines() == everything.stdout.splitlines()[3:6]
    for how in (["-rid", run_id], ["-r", "flags"], [run_id]):
        st = fedml("run", "status", *how, "--json")
        assert st.returncode == 0 and json.loads(st.stdout)["id"] == run_id, (how, st.stderr)
        assert json.loads(st.stdout)["fedml_status"] == "FINISHED"
    old = fedml("job", "status", "-jid", run_id, "--json")  # FedML's older names
    assert old.returncode == 0 and json.loads(old.stdout)["id"] == run_id, old.stderr
    listed = fedml("run", "list", "-r", "flags", "--json")
    assert [x["id"] for x in json.loads(listed.stdout)] == [run_id]
    both = fedml("run", "status", run_id, "-r", "flags")
    assert both.returncode == 2 and "once" in both.stderr and "Traceback" not in both.stderr
    none = fedml("run", "status", "-r", "no-such-name")
    assert none.returncode == 4 and "no run named no-such-name" in none.stderr
    sleeper = write_job(tmp_path / "s", "echo up; sleep 60")
    secret = "fml_u_compat_secret_not_in_argv"
    follower = fedml.popen("launch", "-k", secret, str(sleeper))  # follows the log until the run ends
    try:
        assert follower.stdout is not None and follower.stdout.readline().strip() == "up"
        seen = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if secret in " ".join(p.info["cmdline"] or [])]
        assert seen == [], f"the API key is readable in a command line: {seen}"
        running = [r for r in json.loads(fedml("run", "list", "--json").stdout) if r["status"] == "RUNNING"]
        stop = fedml("run", "stop", "-rid", running[0]["id"], "--json")
        assert stop.returncode == 0 and json.loads(stop.stdout)["status"] == "KILLED", stop.stderr
    finally:
        follower.kill()
        follower.wait(timeout=30)


def test_fedml_state_names() -> None:
    """Ours keep their names; FedML's STOPPING and ABANDONED where they mean something here."""
    from fedml.api.constants import RunStatus
    from fedml_cli.fedml_names import fedml_status

    assert fedml_status({"status": "RUNNING"}) == "RUNNING"
    assert fedml_status({"status": "RUNNING", "stop_requested": True}) == "STOPPING"
    assert fedml_status({"status": "KILLED", "stop_requested": True}) == "KILLED"
    assert fedml_status({"status": "LOST"}) == "ABANDONED"
    assert all(RunStatus.get_run_enum_from_str(fedml_status({"status": s})) != RunStatus.UNDETERMINED
               for s in ("QUEUED", "STARTING", "RUNNING", "FINISHED", "FAILED", "KILLED", "LOST"))


def test_fedml_login_key_joins_this_machine_as_a_node_where_the_scheduler_is_known(fedml: Fedml,
                                                                                    tmp_path: Path) -> None:
    """FedML's `fedml login KEY` (and `fedml device bind KEY`) on a machine that knows its scheduler
    (FEDML_SERVER) joins it as a node; `--client` only stores the credentials; `device unbind` leaves."""
    import time

    assert fedml("run", "list").returncode == 0  # the head: a local scheduler
    state = json.loads((fedml.home / "local" / "scheduler.json").read_text())
    token = (fedml.home / "local" / "token").read_text().strip()
    machine = Fedml(tmp_path / "machine-home")
    env = {"FEDML_SERVER": state["url"]}
    try:
        bind = machine("device", "bind", token, "--name", "compat-node", env=env, timeout=120)
        assert bind.returncode == 0 and "joining this machine as a node" in bind.stderr, bind.stderr
        names: list[str] = []
        deadline = time.monotonic() + 60
        while "compat-node" not in names and time.monotonic() < deadline:
            names = [n["name"] for n in json.loads(fedml("node", "list", "--json").stdout)]
            time.sleep(0.2)
        assert "compat-node" in names
        client = machine("login", token, "--client", env=env)
        assert client.returncode == 0 and "Logged in" in client.stderr, client.stderr
        both = machine("login", token, "--client", "-c", env=env)
        assert both.returncode == 2 and "not both" in both.stderr
        unbind = machine("device", "unbind", env=env, timeout=120)
        assert unbind.returncode == 0, unbind.stderr
        assert "compat-node" not in [n["name"] for n in json.loads(fedml("node", "list", "--json").stdout)]
    finally:
        machine("logout", env=env, timeout=120)


def test_fedml_api_device_bind_joins_this_machine_and_unbind_leaves(fedml: Fedml, tmp_path: Path) -> None:
    """fedml.api.device_bind / login (FedML's Python names) do what `fedml login KEY` does where the scheduler is
    known: this machine joins as a node (the key never in a command line); device_unbind leaves."""
    assert fedml("run", "list").returncode == 0
    state = json.loads((fedml.home / "local" / "scheduler.json").read_text())
    token = (fedml.home / "local" / "token").read_text().strip()
    machine = Fedml(tmp_path / "machine-home")
    sdk = textwrap.dedent('''
        import json, sys, fedml
        joined = fedml.api.device_bind(api_key=sys.argv[1], name="sdk-node")
        print(json.dumps({"joined": joined}))
    ''')
    env = machine.env({"FEDML_SERVER": state["url"]})
    try:
        p = subprocess.run([sys.executable, "-c", sdk, token], capture_output=True, text=True, env=env, timeout=180,
                           stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and json.loads(p.stdout) == {"joined": True}, p.stderr
        assert "sdk-node" in [n["name"] for n in json.loads(fedml("node", "list", "--json").stdout)]
        p = subprocess.run([sys.executable, "-c", "import fedml; print(fedml.api.device_unbind())"],
                           capture_output=True, text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)
        assert p.returncode == 0 and p.stdout.strip() == "True", p.stderr
        assert "sdk-node" not in [n["name"] for n in json.loads(fedml("node", "list", "--json").stdout)]
        p = subprocess.run([sys.executable, "-c", "import fedml; print(fedml.api.login(api_key='nope'))"],
                           capture_output=True, text=True, env=env, timeout=180, stdin=subprocess.DEVNULL)
        assert p.stdout.strip() == "False" and "error" in p.stderr  # a wrong key: False, and why
    finally:
        machine("logout", env={"FEDML_SERVER": state["url"]}, timeout=120)


def test_launch_after_waits_for_a_run_to_end(fedml: Fedml, tmp_path: Path) -> None:
    """`fedml launch --after RUN`: the run starts only once RUN has finished; a bad --after is a usage error."""
    first = write_job(tmp_path / "a", "sleep 1; echo first")
    second = write_job(tmp_path / "b", "echo second")
    a = fedml("launch", str(first), "--detach")
    assert a.returncode == 0, a.stderr
    a_id = a.stdout.strip()
    b = fedml("launch", str(second), "--after", a_id, "--json")  # follows to the end
    assert b.returncode == 0, b.stderr
    b_id = json.loads(b.stdout.splitlines()[-1])["run_id"]
    ra = json.loads(fedml("run", "status", a_id, "--json").stdout)
    rb = json.loads(fedml("run", "status", b_id, "--json").stdout)
    assert ra["status"] == rb["status"] == "FINISHED" and rb["started_at"] >= ra["ended_at"]
    assert rb["after"] == [{"run_id": a_id, "when": "ok"}]
    bad = fedml("launch", str(second), "--after", "run-nope")
    assert bad.returncode == 2 and "no run run-nope" in bad.stderr and "Traceback" not in bad.stderr


WORKFLOW = textwrap.dedent('''
    import json, sys
    from fedml.workflow import JobStatus, TrainJob, Workflow

    a, b, c = (TrainJob(n, p) for n, p in zip("abc", sys.argv[1:4]))
    wf = Workflow("three")
    wf.POLL_S = 0.1
    wf.add_job(a)
    wf.add_job(c, dependencies=[a, b])
    wf.add_job(b, dependencies=[a])
    wf.run()
    out = {"status": wf.get_workflow_status().value, "ids": [a.run_id, b.run_id, c.run_id]}
    d, e = TrainJob("d", sys.argv[4]), TrainJob("e", sys.argv[1])
    bad = Workflow("failing")
    bad.POLL_S = 0.1
    bad.add_job(d)
    bad.add_job(e, dependencies=[d])
    try:
        bad.run()
        out["error"] = None
    except ValueError as exc:
        out["error"] = str(exc)
    out["failing"] = [d.run_id, e.run_id, bad.get_workflow_status().value]
    print(json.dumps(out))
''')


def test_a_fedml_workflow_of_three_jobs_runs_in_dependency_order(fedml: Fedml, tmp_path: Path) -> None:
    """fedml.workflow: a DAG of 3 jobs added out of order runs in dependency order (the scheduler holds each job
    until the ones it depends on have finished); a failed job fails the workflow and the jobs after it."""
    jobs = [write_job(tmp_path / n, body) for n, body in (("a", "sleep 0.5; echo a"), ("b", "sleep 0.3; echo b"),
                                                          ("c", "echo c"), ("d", "exit 3"))]
    got = script(fedml, tmp_path, WORKFLOW, *map(str, jobs))
    assert got["status"] == "FINISHED"
    runs = [json.loads(fedml("run", "status", i, "--json").stdout) for i in got["ids"]]
    a, b, c = runs
    assert all(r["status"] == "FINISHED" for r in runs)
    assert b["started_at"] >= a["ended_at"] and c["started_at"] >= max(a["ended_at"], b["ended_at"])
    assert sorted(x["run_id"] for x in c["after"]) == sorted([a["id"], b["id"]])
    assert got["error"] and "'d'" in got["error"]
    d_id, e_id, status = got["failing"]
    e = json.loads(fedml("run", "status", e_id, "--json").stdout)
    assert status == "FAILED" and e["status"] == "FAILED" and f"{d_id} ended FAILED" in e["reason"]


def test_a_sweep_of_four_points_runs_and_reports(fedml: Fedml, tmp_path: Path) -> None:
    """`sweep:` in the job plus `--sweep` on the command line: one run per point with FEDML_SWEEP_* set, at most
    --max-parallel at once, followed as a whole (exit 0 when every point finished), one row in `fedml run list`,
    its points in `fedml run status SWEEP`; a point that fails fails the launch (exit 1) and `fedml run retry`
    launches it again; `fedml run stop SWEEP` stops every point."""
    job = write_job(tmp_path / "sweep", 'echo "point $FEDML_SWEEP_INDEX lr=$FEDML_SWEEP_LR bs=$FEDML_SWEEP_BS"\n'
                    'if [ "$FEDML_SWEEP_BS" = 128 ] && [ ! -e "$FEDML_FLAG" ]; then exit 3; fi\nsleep 0.3',
                    extra="sweep:\n  lr: [0.1, 0.01]\n")
    r = fedml("launch", str(job), "--sweep", "bs=32,64", "--max-parallel", "2", "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["size"] == 4 and s["counts"] == {"FINISHED": 4} and s["max_parallel"] == 2
    points = [(x["sweep"]["point"]["lr"], x["sweep"]["point"]["bs"]) for x in s["runs"]]
    assert points == [(0.1, 32), (0.1, 64), (0.01, 32), (0.01, 64)]
    for i, run in enumerate(s["runs"]):
        logs = fedml("logs", run["id"]).stdout
        assert f"point {i} lr={points[i][0]} bs={points[i][1]}" in logs
    starts = sorted((x["started_at"], x["ended_at"]) for x in s["runs"])
    for k, (start, _) in enumerate(starts):  # never more than two at once
        assert sum(1 for st, en in starts[:k] if en > start) < 2
    listed = fedml("run", "list").stdout
    assert s["id"] in listed and "SWEEP 4 points: 4 finished" in listed and s["runs"][0]["id"] not in listed
    shown = fedml("run", "status", s["id"]).stdout
    assert "4/4 done" in shown and all(x["id"] in shown for x in s["runs"])

    flag = tmp_path / "flag"
    r = fedml("launch", str(job), "--sweep", "bs=64,128", "--json", "--env", f"FEDML_FLAG={flag}", timeout=180)
    assert r.returncode == 1, r.stderr  # bs=128 failed, twice (lr 0.1 and 0.01)
    failed = json.loads(r.stdout)
    assert failed["counts"] == {"FINISHED": 2, "FAILED": 2}
    flag.write_text("")
    r = fedml("run", "retry", failed["id"], "--json")  # (the same --env: the flag file exists now)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["relaunched"]) == 2
    deadline = time.time() + 120
    while (now := json.loads(fedml("run", "status", failed["id"], "--json").stdout))["done"] < 4:
        assert time.time() < deadline, now
        time.sleep(0.2)
    assert now["counts"] == {"FINISHED": 4} and now["retried"] == 2

    slow = write_job(tmp_path / "slow", "sleep 60", extra="sweep:\n  i: [1, 2, 3]\n")
    r = fedml("launch", str(slow), "--detach")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    assert sid.startswith("sweep-")
    r = fedml("run", "stop", sid, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["counts"] == {"KILLED": 3}
    r = fedml("launch", str(job), "--sweep", "bs", "--dry-run")
    assert r.returncode == 2 and "--sweep: expected NAME=VALUE" in r.stderr


STORAGE_SDK = textwrap.dedent('''
    import json, sys
    import fedml
    up = fedml.api.upload(sys.argv[1], name="notes", description="sdk", metadata={"k": 1})
    listed = fedml.api.list_storage_objects()
    meta = fedml.api.get_storage_user_defined_metadata("notes")
    down = fedml.api.download("notes", dest_path=sys.argv[2])
    gone = fedml.api.delete("notes")
    again = fedml.api.get_storage_metadata("notes")
    print(json.dumps({"up": up.code, "kind": up.data["kind"], "listed": sorted(o["name"] for o in listed.data),
                      "meta": meta.data, "down": down.data, "gone": gone.code, "again": [again.code, again.message]}))
''')


def test_named_storage_uploads_mounts_into_jobs_and_downloads(fedml: Fedml, tmp_path: Path) -> None:
    """`fedml storage upload/list/get-metadata/download/delete` and FedML's fedml.api storage calls; a job's
    `storage:` gets the objects unpacked into its workspace; a workspace whose mount point is a symlink makes the
    run fail saying so (nothing is written through it)."""
    data = tmp_path / "mnist"
    (data / "sub").mkdir(parents=True)
    (data / "train.csv").write_text("1,2\n")
    (data / "sub" / "x.txt").write_text("deep\n")
    (tmp_path / "notes.txt").write_text("a note\n")
    r = fedml("storage", "upload", str(data), "-d", "digits", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "mnist" and json.loads(r.stdout)["files"] == 2
    r = fedml("storage", "upload", str(tmp_path / "notes.txt"), "-n", "cfg", "-um", '{"v": "1"}')
    assert r.returncode == 0, r.stderr
    r = fedml("storage", "list")
    assert "mnist" in r.stdout and "digits" in r.stdout and "cfg" in r.stdout
    meta = json.loads(fedml("storage", "get-metadata", "cfg", "--json").stdout)
    assert meta["kind"] == "file" and meta["filename"] == "notes.txt" and meta["metadata"] == {"v": "1"}
    job = write_job(tmp_path / "job", "cat data/train.csv data/sub/x.txt cfg/notes.txt",
                    extra="storage:\n  - {name: mnist, path: data/}\n  - {name: cfg}\n")
    r = fedml("launch", str(job), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["1,2", "deep", "a note"]
    out = tmp_path / "out"
    out.mkdir()
    assert fedml("storage", "download", "mnist", "-p", str(out)).returncode == 0
    assert (out / "mnist" / "sub" / "x.txt").read_text() == "deep\n"
    r = fedml("storage", "download", "mnist", "-p", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr  # nothing overwritten
    linked = write_job(tmp_path / "linked", "ls data", extra="storage:\n  - {name: mnist, path: data}\n",
                       workspace={"real/keep.txt": "mine\n"})
    (linked.parent / "ws" / "data").symlink_to("real")
    r = fedml("launch", str(linked), "--json", timeout=120)
    assert r.returncode != 0
    run = json.loads(fedml("run", "status", json.loads(r.stdout.splitlines()[-1])["run_id"], "--json").stdout)
    assert run["status"] == "FAILED" and "storage mnist" in run["reason"], run["reason"]
    got = script(fedml, tmp_path, STORAGE_SDK, str(tmp_path / "notes.txt"), str(out))
    assert got["up"] == "SUCCESS" and got["kind"] == "file" and got["listed"] == ["cfg", "mnist", "notes"]
    assert got["meta"] == {"k": "1"} and got["down"] == str(out / "notes.txt") and got["gone"] == "SUCCESS"
    assert got["again"][0] == "FAILURE" and "no storage object notes" in got["again"][1]
    assert fedml("storage", "delete", "mnist").returncode == 0
    r = fedml("launch", str(job))
    assert r.returncode == 2 and "no storage object mnist" in r.stderr and "job.yaml" in r.stderr
