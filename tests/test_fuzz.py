"""Bad input: the API fuzzed with schemathesis from its own OpenAPI schema (a real scheduler process, on the
SQLite and on the Redis store) must never answer 5xx or hang; the job YAML parser fed >= 1,000 generated bad
files must answer each with one clean validation error (exit 2), never a traceback; an oversized workspace is
refused with 413 and nothing is half-written.

Examples per API operation and mode (valid, invalid): FEDML_FUZZ_EXAMPLES (default 15).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from typer.testing import CliRunner

from fedml_cli.main import app as cli_app
from fedml_cli.main import pruned
from scheduler.contract.transport import httpx

from .conftest import Fedml
from .procs import free_port, wait_for
from .replicas import ROOT, Replicas
from .test_store_contract import redis_url

EXAMPLES = int(os.environ.get("FEDML_FUZZ_EXAMPLES", "15"))
ADMIN = "fml_a_fuzz-admin-key-0123456789abcdef"


def invoke(args: list[str], **kw: Any) -> Any:
    """`fedml ARGS` in process, dispatched as the executable does (fedml_cli/main.py: main builds only the command
    path the words name; tests/test_cli_output.py holds that to the whole tree's help and errors): ~10 ms a call
    where building the whole tree each time took ~60-140 ms, so the examples below are affordable in `make test`."""
    return CliRunner().invoke(pruned(args) or cli_app, args, **kw)


# ---- the API -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sqlite", "redis"])
def api_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    store = "sqlite" if request.param == "sqlite" else redis_url()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDML_")}
    env.update(FEDML_ADMIN_KEY=ADMIN, FEDML_HOME=str(home))
    log = open(home / "scheduler.log", "wb")  # noqa: SIM115 - the child's
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.server", "--store", store, "--home", str(home),
                             "--port", str(port), "--no-agent", "--quiet", "--max-workspace-mb", "1"],
                            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (home / "scheduler.log").read_text()
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_for("the scheduler to answer", up, timeout=30)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if store != "sqlite":
            from scheduler.redis_store import wipe_prefix

            wipe_prefix(store)
        errors = [ln for ln in (home / "scheduler.log").read_text(errors="replace").splitlines() if "Traceback" in ln]
        assert not errors, (home / "scheduler.log").read_text()[-4000:]


def _operations() -> dict[str, Any]:
    """The API's operations, from the OpenAPI schema the app itself publishes (built in process, no server)."""
    import tempfile

    from scheduler.app import Settings, create_app
    from scheduler.sqlite_store import SQLiteStore

    with tempfile.TemporaryDirectory() as d:
        spec = create_app(SQLiteStore(":memory:"), Settings(blob_dir=Path(d))).openapi()
    ops = {}
    for result in schemathesis.openapi.from_dict(spec).get_all_operations():
        op = result.ok()
        ops[f"{op.method.upper()} {op.path}"] = op
    return ops


OPERATIONS = _operations()


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_api_never_answers_a_server_error_or_hangs(api_server: str, label: str) -> None:
    from schemathesis.generation import GenerationMode

    op = OPERATIONS[label]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):  # valid requests, then invalid ones
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            # A request that hangs past the timeout raises, and fails the test as a 5xx would.
            resp = case.call(base_url=api_server, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=15)
            assert resp.status_code < 500, (case.method, case.formatted_path, case.query, case.body, resp.text[:500])

        try:
            fuzz()
        except Unsatisfiable:
            # Nothing about this operation can be made invalid (no parameters, no body): positive cases only.
            assert mode == GenerationMode.NEGATIVE, label


# ---- the job YAML parser -----------------------------------------------------------------------------------

VALID: dict[str, Any] = {
    "workspace": "ws", "job": "echo hi", "bootstrap": "true", "job_type": "train",
    "computing": {"minimum_num_gpus": 1, "resource_type": "A100-80G", "maximum_cost_per_hour": "$3",
                  "device_type": "GPU"},
    "num_nodes": 1, "priority": 0, "retry": {"max_attempts": 2, "on": ["lost"]}, "max_duration": "1h",
    "envs": {"A": "b"}, "labels": {"zone": "a"},
}

# Each: (path to a field, a strategy of values it must refuse).
junk = st.one_of(st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                   min_size=1, max_size=2))
BREAKS: list[tuple[tuple[str, ...], st.SearchStrategy[Any]]] = [
    (("computing", "minimum_num_gpus"), st.one_of(st.integers(max_value=-1), st.text(min_size=1).filter(
        lambda s: not s.strip().lstrip("+").isdigit()), junk)),
    (("num_nodes",), st.one_of(st.integers(max_value=0), st.sampled_from(["many", "1.5x", ""]), junk)),
    (("priority",), st.one_of(st.sampled_from(["high", "x", "1e"]), junk, st.floats(allow_nan=True).filter(
        lambda f: f != int(f) if f == f and abs(f) != float("inf") else True))),
    (("retry", "max_attempts"), st.one_of(st.integers(max_value=0), st.integers(min_value=101), junk)),
    (("retry", "on"), st.lists(st.text(min_size=1).filter(lambda s: s.strip() not in ("lost", "error")),
                               min_size=1, max_size=3)),
    (("job_type",), st.text(min_size=1).filter(lambda s: s.strip().lower() not in (
        "train", "deploy", "serve", "federate", "federated", "training", "serving", "inference"))),
    (("computing", "maximum_cost_per_hour"), st.sampled_from(["$", "cheap", "$-1", "3$3", "$$5", "-2"])),
    (("max_duration",), st.sampled_from(["forever", "-1h", "1x", "h1", "1.2.3m", "0"])),
    (("job",), st.one_of(st.integers(), junk.filter(lambda v: not isinstance(v, list)))),
    (("envs",), st.one_of(st.lists(st.integers(), min_size=1), st.text(min_size=1))),
    (("labels",), st.one_of(st.lists(st.integers(), min_size=1), st.integers())),
    (("computing",), st.one_of(st.lists(st.integers(), min_size=1), st.integers(), st.text(min_size=1))),
    (("retry",), st.one_of(st.lists(st.integers(), min_size=1), st.integers())),
]


@st.composite
def bad_job(draw: st.DrawFn) -> str:
    """A job file that must be refused: a valid job with one field broken, a document that is not a mapping,
    or a file that is not YAML."""
    kind = draw(st.sampled_from(["field"] * 6 + ["shape", "syntax"]))
    if kind == "shape":
        doc = draw(st.one_of(st.lists(st.integers(), min_size=1), st.integers(), st.text(min_size=1).filter(
            lambda s: not isinstance(yaml.safe_load(json.dumps(s)), dict))))
        return json.dumps(doc)
    if kind == "syntax":
        # Unbalanced brackets and quotes, tabs where YAML forbids them, a key without a value mapping.
        return draw(st.sampled_from(["job: [echo", "job: {a: 1", 'job: "echo\n', "job: 'x\n", "\tjob: echo\n",
                                     "job: echo\n  - bad: [\n", "job: echo\ncomputing: {minimum_num_gpus: 1\n",
                                     "- job\njob: echo\n", "job: echo\n? [\n", "job: *alias\n"]))
    doc = copy.deepcopy(VALID)
    path, values = draw(st.sampled_from(BREAKS))
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = draw(values)
    return yaml.safe_dump(doc, allow_unicode=True)


def _check_refused(result: Any, name: str) -> None:
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), out


_SEEN = [0]


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=bad_job())
def test_a_thousand_bad_job_files_each_get_one_clean_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("bad", numbered=True)
    (d / "ws").mkdir()
    (d / "job.yaml").write_text(text)
    result = invoke(["launch", str(d / "job.yaml"), "--dry-run"], env={"COLUMNS": "300"})
    _check_refused(result, str(d / "job.yaml"))
    _SEEN[0] += 1


def test_the_bad_job_fuzzer_ran_a_thousand_inputs() -> None:
    if _SEEN[0] == 0:
        pytest.skip("run together with test_a_thousand_bad_job_files_each_get_one_clean_error")
    assert _SEEN[0] >= 1000, _SEEN[0]


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1"))))
def test_arbitrary_text_is_refused_cleanly_or_accepted(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("any", numbered=True)
    (d / "job.yaml").write_text(text, errors="surrogateescape")
    result = invoke(["launch", str(d / "job.yaml"), "--dry-run"])
    if result.exit_code != 0:
        _check_refused(result, str(d / "job.yaml"))


@settings(max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=bad_job())
def test_bad_job_files_through_the_real_executable(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("exe", numbered=True)
    (d / "ws").mkdir()
    (d / "job.yaml").write_text(text)
    r = Fedml(d / "home")("launch", "job.yaml", "--dry-run", cwd=d, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: job.yaml") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (d / "home" / "local" / "scheduler.json").exists()  # nothing started, nothing submitted


# ---- upload limits on replicas -----------------------------------------------------------------------------

def test_an_oversized_workspace_is_refused_whole_by_the_replicas(tmp_path: Path) -> None:
    c = Replicas(tmp_path / "c", n=2)  # --max-workspace-mb 1, one blob dir shared by both replicas
    try:
        c.start()
        big = tmp_path / "job"
        (big / "ws").mkdir(parents=True)
        (big / "ws" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # incompressible
        (big / "job.yaml").write_text("workspace: ws\njob: ls -l data.bin\n")
        env = {"FEDML_SERVER": c.server, "FEDML_API_KEY": c.admin}
        for _ in range(2):  # once through each replica
            r = Fedml(tmp_path / "client")("launch", "job.yaml", "--detach", cwd=big, env=env, timeout=60)
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
            assert "larger than the limit of 1 MiB" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        blobs = c.base / "blobs"
        assert not [p for p in blobs.rglob("*") if p.is_file()], "a partial upload was left behind"
        assert c.call("GET", "/runs").json() == []  # nothing submitted
        sha = "0" * 64
        r = c.call("PUT", f"/blobs/{sha}", content=os.urandom(2 * 1024 * 1024))
        assert r.status_code == 413 and "larger than the limit" in r.json()["detail"], r.text
        r = c.call("POST", "/runs", json={"job": {"job": "echo"}, "workspace_sha": sha})
        assert r.status_code == 400 and "has not been uploaded" in r.json()["detail"], r.text
    finally:
        c.close()


# ---- the YAML grammar: aliases, nesting, sizes, encodings --------------------------------------------------

KEYS = ["job", "workspace", "computing", "minimum_num_gpus", "envs", "retry", "on", "labels", "job_type",
        "service", "federate", "docker", "image", "num_nodes", "max_duration", "x", "bootstrap"]


@st.composite
def yaml_grammar(draw: st.DrawFn) -> bytes:
    """YAML text built from its grammar: block and flow collections nested up to 8 deep (deeper: the brackets
    below, up to 5,000), anchors and aliases (forward, backward, to themselves), long and odd scalars, tags,
    documents; then encoded as UTF-8, UTF-8 with a BOM, UTF-16, Latin-1, or with NULs and stray bytes.
    (A node has 1.1 children or more on average: a tree allowed 40 levels grew to the limit, and drawing it took
    ~130 ms an example, most of this test's time.)"""
    anchors: list[str] = []

    def scalar() -> str:
        return draw(st.one_of(
            st.sampled_from(["echo hi", "1", "-1", "1e400", ".inf", "-.nan", "~", "null", "true", "0x1f", "0o17",
                             "'quoted'", '"esc \\u2028 \\x00"', "|\n  block\n", ">-\n  folded\n", "!!binary aGk=",
                             "!!python/object:os.system x", "!custom x", "2026-12-05", "$3", "A100-80G:2"]),
            st.text(max_size=20).map(json.dumps),
            st.integers(min_value=1, max_value=200_000).map(lambda n: "x" * n)))

    def node(depth: int) -> str:
        kind = draw(st.sampled_from(["scalar", "scalar", "map", "seq", "flow", "alias", "anchor"]
                                    if depth < 8 else ["scalar", "alias"]))
        if kind == "scalar":
            return scalar()
        if kind == "alias":
            return f"*{draw(st.sampled_from(anchors))}" if anchors else scalar()
        if kind == "anchor":
            name = f"a{len(anchors)}"
            anchors.append(name)
            return f"&{name} {node(depth + 1)}" if draw(st.booleans()) else f"&{name} [*{name}]"
        if kind == "flow":
            n = draw(st.integers(0, 4))
            return "[" + ", ".join(node(depth + 1).replace("\n", " ") for _ in range(n)) + "]"
        pad = "  " * (depth + 1)
        n = draw(st.integers(1, 4))
        if kind == "seq":
            return "\n" + "\n".join(f"{pad}- {node(depth + 1)}" for _ in range(n))
        return "\n" + "\n".join(f"{pad}{draw(st.sampled_from(KEYS))}: {node(depth + 1)}" for _ in range(n))

    body = "\n".join(f"{draw(st.sampled_from(KEYS))}: {node(0)}" for _ in range(draw(st.integers(1, 6))))
    if draw(st.booleans()):
        body = "job: echo hi\n" + body  # often a job, so deeper checks run
    if draw(st.integers(0, 9)) == 0:
        body = "[" * draw(st.integers(50, 5000)) + "]" * draw(st.integers(0, 50))  # deep nesting
    if draw(st.integers(0, 9)) == 0:  # an alias bomb of random width and depth
        w, d = draw(st.integers(2, 12)), draw(st.integers(2, 12))
        body = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * w)}]\n" for i in range(1, d)) \
            + "job: echo hi\n"
    enc = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "nul", "junk"]))
    if enc == "nul":
        return body.encode() + b"\0" + body.encode()
    if enc == "junk":
        return body.encode() + bytes(draw(st.lists(st.integers(0x80, 0xff), min_size=1, max_size=8)))
    return body.encode(enc, errors="replace")


def _clean(result: Any, name: str, took: float) -> None:
    assert took < 5, f"took {took:.1f} s"
    assert isinstance(result.exception, SystemExit) or result.exception is None, result.exception
    assert result.exit_code in (0, 2), (result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {name}"), result.output


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=yaml_grammar())
def test_the_yaml_grammar_never_gives_a_traceback_or_a_hang(tmp_path_factory: pytest.TempPathFactory,
                                                            data: bytes) -> None:
    import time

    d = tmp_path_factory.mktemp("grammar", numbered=True)
    (d / "ws").mkdir()
    (d / "job.yaml").write_bytes(data)
    t = time.monotonic()
    result = invoke(["launch", str(d / "job.yaml"), "--dry-run"], env={"COLUMNS": "300"})
    _clean(result, str(d / "job.yaml"), time.monotonic() - t)


# ---- the CLI's argument space -------------------------------------------------------------------------------

COMMANDS = [["launch"], ["logs"], ["run", "list"], ["run", "status"], ["run", "stop"], ["run", "artifacts"],
            ["node", "list"], ["node", "remove"], ["node", "drain"], ["endpoint", "list"], ["endpoint", "status"],
            ["endpoint", "scale"], ["endpoint", "delete"], ["template", "list"], ["template", "show"],
            ["template", "init"], ["scheduler", "key", "revoke"], ["scheduler", "key", "list"],
            ["scheduler", "token", "create"], ["scheduler", "status"], ["version"], ["env"], ["login"], []]
OPTIONS = ["--json", "--tail", "--rank", "--status", "--limit", "-f", "--env", "--dry-run", "--strict", "--detach",
           "--name", "--download", "--wait", "--help", "--server", "--gpus", "--label", "--undo", "--port", "-x"]
ARG = st.one_of(st.sampled_from(["", "#", "?", "x?y=1", "../..", "/", "run-", "-1", "0", "99999999999999999999",
                                 "K=V", "=", "a b", "%2e%2e", "\u2028", "nan", "hello", "job.yaml"]),
                st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30))


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(cmd=st.sampled_from(COMMANDS), args=st.lists(st.one_of(ARG, st.sampled_from(OPTIONS)), max_size=6))
def test_any_command_line_exits_cleanly_and_submits_nothing(tmp_path_factory: pytest.TempPathFactory,
                                                            cmd: list[str], args: list[str]) -> None:
    """Whatever the arguments: a clean exit code (0 ok, 1 failed, 2 usage, 3 unreachable, 4 not found), no
    traceback, no hang past 5 s. The scheduler address is a closed loopback port: nothing can be submitted."""
    import time

    from fedml_cli.errors import CliError

    d = tmp_path_factory.mktemp("argv", numbered=True)
    (d / "ws").mkdir()
    (d / "job.yaml").write_text("workspace: ws\njob: echo hi\n")
    if cmd == ["login"] and any(a.startswith("fml_j_") for a in args):
        return  # a join token would start an agent (that waits for the scheduler): not this test's business
    here = os.getcwd()
    os.chdir(d)  # `template init NAME` and relative paths land here
    t = time.monotonic()
    try:
        result = invoke([*cmd, *args], env={
            "FEDML_HOME": str(d / "home"), "FEDML_SERVER": "http://127.0.0.1:9", "FEDML_API_KEY": "fml_u_x",
            "COLUMNS": "200"})
    finally:
        took = time.monotonic() - t
        os.chdir(here)
    exc = result.exception
    assert took < 5, (cmd, args, f"{took:.1f} s")
    assert exc is None or isinstance(exc, SystemExit | CliError), (cmd, args, repr(exc), result.output)
    code = exc.code if isinstance(exc, CliError) else result.exit_code
    assert code in (0, 1, 2, 3, 4), (cmd, args, code, result.output)
    assert "Traceback" not in result.output, (cmd, args, result.output)
    assert not (d / "home" / "local" / "scheduler.json").exists(), "a local scheduler was started"


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(cmd=st.sampled_from([c for c in COMMANDS if c != ["login"]]),
       args=st.lists(st.one_of(ARG, st.sampled_from(OPTIONS)), max_size=5))
def test_command_lines_through_the_real_executable(tmp_path_factory: pytest.TempPathFactory, cmd: list[str],
                                                   args: list[str]) -> None:
    d = tmp_path_factory.mktemp("exe-argv", numbered=True)
    r = Fedml(d / "home")(*cmd, *args, cwd=d, timeout=5,
                          env={"FEDML_SERVER": "http://127.0.0.1:9", "FEDML_API_KEY": "fml_u_x"})
    assert r.returncode in (0, 1, 2, 3, 4), (cmd, args, r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, (cmd, args, r.stderr)
    assert not (d / "home" / "local" / "scheduler.json").exists()


@pytest.mark.parametrize("key", [b"\x80", "é".encode(), b"a b", b"x" * 5000, b"fml_a_\x1b[31m"])
def test_login_with_a_key_no_api_key_can_be_is_a_usage_error(tmp_path: Path, key: bytes) -> None:
    """Found by the fuzzer: a non-ASCII key crashed in the HTTP header, an undecodable one in the hand-over
    pipe, and one over 64 KiB would have blocked on it."""
    from .conftest import FEDML

    env = Fedml(tmp_path / "home").env()
    r = subprocess.run([FEDML.encode(), b"login", key, b"--server", b"http://127.0.0.1:9"], capture_output=True,
                       timeout=10, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and b"Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(b"error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    env_key = subprocess.run([FEDML, "run", "list"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
                             env={**env, "FEDML_SERVER": "http://127.0.0.1:9", "FEDML_API_KEY": "ab\u00e9"})
    assert env_key.returncode == 2 and "API key" in env_key.stderr, env_key.stderr
