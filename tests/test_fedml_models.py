"""FedML's model cards end to end (`fedml model create/deploy/run/list/delete`, `fedml.api.model_*`): the real
`fedml` command, a real local scheduler and agent, and FedML's quick-start predictor (written as FedML's
example is) answering through the scheduler's gateway. The corpus's model configs are accepted as written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from .conftest import COMPAT, Fedml, needs

# FedML's deploy quick start (python/examples/deploy/quick_start/src/main_entry.py), as its users write it.
QUICK_START = textwrap.dedent('''
    from fedml.serving import FedMLPredictor
    from fedml.serving import FedMLInferenceRunner


    class Bot(FedMLPredictor):  # Inherit FedMLClientPredictor
        def __init__(self):
            super().__init__()

        def predict(self, request: dict):
            input_dict = request
            question: str = input_dict.get("text", "").strip()
            response = "I do not know the answer to your question."
            return {"generated_text": f"The answer to your question {question} is: {response}"}


    if __name__ == "__main__":
        chatbot = Bot()
        fedml_inference_runner = FedMLInferenceRunner(chatbot)
        fedml_inference_runner.run()
''')


def model_configs() -> list[Path]:
    if not COMPAT.is_dir():
        return []
    return sorted({*COMPAT.glob("deploy/**/*.yaml"), *COMPAT.glob("**/fedml_model_config.yaml"),
                   *COMPAT.glob("other/**/serving/**/config.yaml")})


def beside_workspace(src: Path, dst_dir: Path, entry_text: str = "print('hi')\n") -> Path:
    """The config copied unchanged into dst_dir, with the workspace and entry point it names made there."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    data = yaml.safe_load(src.read_text()) or {}
    ws = dst_dir / str(data.get("workspace") or ".")
    ws.mkdir(parents=True, exist_ok=True)
    if data.get("entry_point"):
        (ws / data["entry_point"]).parent.mkdir(parents=True, exist_ok=True)
        (ws / data["entry_point"]).write_text(entry_text)
    return dst


def test_model_corpus_present() -> None:
    needs("the FedML compatibility corpus", COMPAT.is_dir(), f"{COMPAT} is missing")
    assert len(model_configs()) >= 20, model_configs()


@pytest.mark.parametrize("rel", [str(f.relative_to(COMPAT)) for f in model_configs()] or ["<corpus missing>"])
def test_each_fedml_model_config_is_accepted(rel: str, fedml: Fedml, tmp_path: Path) -> None:
    """`fedml model create -n NAME -cf FILE` takes every model config of FedML's examples as written; its serve
    job passes our job checks, except where it names only an image (said at create and at deploy)."""
    needs("the FedML compatibility corpus", COMPAT.is_dir(), f"{COMPAT} is missing")
    src = COMPAT / rel
    cfg = beside_workspace(src, tmp_path / "model")
    r = fedml("model", "create", "-n", "m1", "-cf", cfg.name, "--json", cwd=cfg.parent, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    card = json.loads(r.stdout)
    assert card["config"] == yaml.safe_load(src.read_text())
    assert cfg.read_bytes() == src.read_bytes()
    data = card["config"]
    runs = any(data.get(k) for k in ("entry_point", "job", "container_run_command"))
    r = fedml("model", "deploy", "-n", "m1", "--dry-run", "--json", timeout=60)
    assert "Traceback" not in r.stdout + r.stderr
    if not runs:  # an image and its own CMD: said, with the key, and nothing launched
        assert r.returncode == 2 and "inference_image_name" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert card["not_deployable"]
        return
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["job"]
    assert job["job_type"] == "serve" and job["service"]["name"] == "m1"
    assert job["workspace"] == card["workspace"] and Path(job["workspace"]).is_dir()
    if data.get("entry_point"):
        assert data["entry_point"] in job["job"]
    assert job["service"]["readiness_path"] == ((data.get("readiness_probe") or {}).get("httpGet") or {}).get(
        "path", "/ready")
    assert not (fedml.home / "local" / "scheduler.json").exists(), "a dry run started a scheduler"


@pytest.mark.parametrize("text,line,key,says", [
    ("workspace: .\nentry_point: main.py\nport: http\n", 3, "port", "expected a port number"),
    ("workspace: .\nentry_point: missing.py\n", 2, "entry_point", "no such file in the workspace"),
    ("workspace: .\nentry_point: ../main.py\n", 2, "entry_point", "inside the workspace"),
    ("workspace: ./nope\nentry_point: main.py\n", 1, "workspace", "directory not found"),
    ("- a list\n", 1, None, "expected a mapping of model config keys"),
    ("workspace: .\nentry_point: main.py\nenvironment_variables:\n  1BAD: x\n", 4, "environment_variables.1BAD",
     "not a valid environment variable name"),
    ("workspace: .\nentry_point: main.py\nreadiness_probe:\n  httpGet:\n    path: ready\n", 3, "readiness_probe",
     'must start with "/"'),
    ("workspace: .\nentry_point: main.py\ndeploy_timeout_sec: -5\n", 3, "deploy_timeout_sec", "above 0"),
    ("workspace: .\nentry_point: [main.py\n", 2, None, "YAML syntax error"),
])
def test_a_bad_model_config_is_one_line_naming_file_line_key(text: str, line: int, key: str | None, says: str,
                                                             fedml: Fedml, tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("print(1)\n")
    (tmp_path / "config.yaml").write_text(text)
    r = fedml("model", "create", "-n", "bad", "-cf", "config.yaml", cwd=tmp_path, timeout=60)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: config.yaml:{line}: " + (f"{key}: " if key else "")), r.stderr
    assert says in r.stderr
    assert not (fedml.home / "models" / "bad").exists()


def test_fedmls_quick_start_predictor_answers_through_model_run(fedml: Fedml, tmp_path: Path) -> None:
    """The deploy quick start as FedML ships it: create the card, deploy it, call it with `fedml model run` and
    with fedml.api.model_run, then delete the endpoint and the card."""
    src = COMPAT / "deploy" / "quick_start" / "config.yaml"
    needs("the FedML compatibility corpus", src.is_file(), f"{src} is missing")
    cfg = beside_workspace(src, tmp_path / "quick_start", QUICK_START)
    r = fedml("model", "create", "-n", "quick-start", "-cf", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "fedml model deploy -n quick-start" in r.stderr
    r = fedml("model", "create", "-n", "quick-start", "-cf", str(cfg))
    assert r.returncode == 2 and "exists already" in r.stderr  # not replaced without --force
    r = fedml("model", "deploy", "-n", "quick-start", "-e", "qs", "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["endpoint"]["name"] == "qs" and out["endpoint"]["ready"] >= 1
    r = fedml("model", "run", "-e", "qs", '{"text": "what is fedml?"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "generated_text": "The answer to your question what is fedml? is: I do not know the answer to your question."}
    r = fedml("model", "run", "-e", "qs", "not json")
    assert r.returncode == 2 and "not JSON" in r.stderr
    r = fedml("model", "run", "-e", "nosuch", "{}")
    assert r.returncode == 4, r.stderr
    sdk = textwrap.dedent('''
        import json, fedml
        print(json.dumps({"answer": fedml.api.model_run("qs", {"text": "sdk"}),
                          "cards": [c["name"] for c in fedml.api.model_list()],
                          "missing": fedml.api.model_run("nosuch", "{}")}))
    ''')
    p = subprocess.run([sys.executable, "-c", sdk], capture_output=True, text=True, env=fedml.env(), timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["answer"]["generated_text"].startswith("The answer to your question sdk is")
    assert got["cards"] == ["quick-start"] and got["missing"] is None and "HTTP 404" in p.stderr
    r = fedml("endpoint", "delete", "qs")
    assert r.returncode == 0, r.stderr
    r = fedml("model", "list", "--json")
    assert [c["name"] for c in json.loads(r.stdout)] == ["quick-start"]
    assert fedml("model", "delete", "-n", "quick-start").returncode == 0
    assert fedml("model", "deploy", "-n", "quick-start").returncode == 4


def test_a_model_whose_replicas_never_get_ready_fails_its_deploy_after_the_timeout(fedml: Fedml,
                                                                                   tmp_path: Path) -> None:
    """FedML's dummy_failed example (its job exits 1): the supervisor keeps restarting the replica, and deploy
    says after its timeout that no replica got ready, naming the run."""
    src = COMPAT / "deploy" / "dummy_failed" / "config.yaml"
    needs("the FedML compatibility corpus", src.is_file(), f"{src} is missing")
    cfg = beside_workspace(src, tmp_path / "dummy")
    assert fedml("model", "create", "-n", "dummy", "-cf", str(cfg)).returncode == 0
    r = fedml("model", "deploy", "-n", "dummy", "--timeout", "3", timeout=120)
    assert r.returncode == 1, r.stderr
    assert "no replica ready after 3 s" in r.stderr and "fedml run logs run-" in r.stderr
    assert fedml("endpoint", "delete", "dummy").returncode == 0


# ---- fedml.serving, in process -------------------------------------------------------------------------

def _serve(predictor: object) -> tuple[ThreadingHTTPServer, str]:
    from fedml.serving import _handler

    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(predictor))  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_predictor_base_class_and_runner() -> None:
    from fedml.serving import FedMLPredictor

    class Nothing(FedMLPredictor):
        pass

    with pytest.raises(NotImplementedError):
        Nothing()

    class Model(FedMLPredictor):
        warm = False

        def predict(self, request: dict, header: str = "") -> object:
            if request.get("stream"):
                return (f"tok{i} " for i in range(3))
            if request.get("boom"):
                raise ValueError("bad input")
            return {"echo": request, "accept": header}

        def ready(self) -> bool:
            return self.warm

    class Async(FedMLPredictor):
        async def async_predict(self, request: dict) -> dict:
            return {"async": request["x"] * 2}

    m = Model()
    server, url = _serve(m)
    try:
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url + "/ready", timeout=10)
        assert exc.value.code == 503  # not ready yet: the supervisor keeps it out of the gateway
        m.warm = True
        with urllib.request.urlopen(url + "/ready", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read()) == {"status": "Success"}
        status, body = _post(url + "/predict", b'{"a": 1}', {"accept": "application/json"})
        assert status == 200 and json.loads(body) == {"echo": {"a": 1}, "accept": "application/json"}
        status, body = _post(url + "/predict", b'{"stream": true}')
        assert status == 200 and body == b"tok0 tok1 tok2 "
        status, body = _post(url + "/predict", b'{"boom": true}')
        assert status == 500 and b"ValueError: bad input" in body
        assert _post(url + "/predict", b"{not json")[0] == 400
        assert _post(url + "/other", b"{}")[0] == 404
        import fedml.serving as serving

        before, serving.MAX_BODY = serving.MAX_BODY, 10
        try:
            assert _post(url + "/predict", b'{"a": "more than ten bytes"}')[0] == 413
        finally:
            serving.MAX_BODY = before
    finally:
        server.shutdown()
    server, url = _serve(Async())
    try:
        assert _post(url + "/predict", b'{"x": 21}') == (200, b'{"async": 42}')
    finally:
        server.shutdown()
