"""`fedml launch JOB.yaml --dry-run` through the real executable: the FedML corpus is accepted as written,
malformed files give exit 2 and one `error: FILE:LINE: field: message` line, and nothing is submitted."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .conftest import COMPAT, Fedml, needs


def compat_files() -> list[Path]:
    if not COMPAT.is_dir():
        return []
    return sorted({*COMPAT.glob("launch/*.yaml"), *COMPAT.glob("train/*/*.yaml")})


def assert_nothing_submitted(fedml: Fedml) -> None:
    local = fedml.home / "local"
    assert not (local / "scheduler.json").exists(), "a scheduler was started"
    assert not (local / "scheduler.db").exists(), "a scheduler store was created"


# ---- the FedML corpus, unchanged ---------------------------------------------------------------------------

def test_compat_corpus_present() -> None:
    needs("the FedML compatibility corpus", COMPAT.is_dir(), f"{COMPAT} is missing")
    files = compat_files()
    assert len(files) >= 10, [str(f) for f in files]


@pytest.mark.parametrize("rel", [str(f.relative_to(COMPAT)) for f in compat_files()] or ["<corpus missing>"])
def test_compat_yaml_passes_dry_run(rel: str, fedml: Fedml, tmp_path: Path) -> None:
    needs("the FedML compatibility corpus", COMPAT.is_dir(), f"{COMPAT} is missing")
    src = COMPAT / rel
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    dst = job_dir / src.name
    shutil.copyfile(src, dst)
    ws = (yaml.safe_load(src.read_text()) or {}).get("workspace")
    ws_dir: Path | None = None
    if isinstance(ws, str) and ws.strip():
        ws_dir = (job_dir / ws).resolve()
        ws_dir.mkdir(parents=True, exist_ok=True)
        (ws_dir / "main.py").write_text("print('hi')\n")

    r = fedml("launch", dst.name, "--dry-run", cwd=job_dir, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "valid (dry run, nothing submitted)" in r.stdout
    assert "warning" not in r.stderr, r.stderr  # FedML's own keys are never reported as typos
    assert dst.read_bytes() == src.read_bytes()  # validated exactly as written

    r = fedml("launch", dst.name, "--dry-run", "--json", cwd=job_dir, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["workspace_dir"] == (str(ws_dir) if ws_dir else None)
    assert out["job"]["job_type"] in ("train", "deploy", "serve", "federate")
    assert all(k.startswith("FEDML_ENV_") for k in out["exported_env"])
    assert_nothing_submitted(fedml)


# ---- malformed files ---------------------------------------------------------------------------------------

@dataclass
class Bad:
    id: str
    text: str | bytes | None          # None: the job file is not created
    line: int | None                  # expected line (None: the message names no line)
    field: str | None                 # expected field (None: none)
    fragment: str                     # part of the message
    args: list[str] = field(default_factory=list)
    file: str = "job.yaml"
    exact: str | None = None          # the whole stderr line, when it is pinned down
    setup: str | None = None          # "ws-file": `ws` is a file, not a directory


WS = "workspace: ws\n"

BAD = [
    Bad("gpus-two", WS + "job: echo hi\ncomputing:\n  minimum_num_gpus: two\n", 4, "computing.minimum_num_gpus",
        "two", exact='error: job.yaml:4: computing.minimum_num_gpus: expected an integer, got "two"'),
    Bad("missing-job", WS + "job_type: train\ncomputing:\n  minimum_num_gpus: 1\n", 1, "job", "required"),
    Bad("empty-job", WS + "# the job\n\njob: ''\n", 4, "job", "required"),
    Bad("null-job", WS + "job:\nbootstrap: echo hi\n", 2, "job", "required"),
    Bad("unknown-job-type", WS + "job: echo\n# kind\njob_type: magic\n", 4, "job_type", '"magic"'),
    Bad("yaml-unclosed-bracket", WS + "job: echo\nlabels: [a, b\n", 3, None, "YAML syntax error"),
    Bad("yaml-unclosed-brace-midfile", WS + "job: echo\nlabels: {a: b\ncomputing:\n  minimum_num_gpus: 1\n", 4,
        None, "YAML syntax error"),
    Bad("yaml-unclosed-quote", WS + 'job: "echo hi\n', 2, None, "YAML syntax error"),
    Bad("yaml-bad-indent", WS + "job: echo\ncomputing:\n  minimum_num_gpus: 1\n    resource_type: T4\n", 5, None,
        "mapping values are not allowed"),
    Bad("yaml-bad-dedent", WS + "job: echo\ncomputing:\n    minimum_num_gpus: 1\n  resource_type: T4\n", 5, None,
        "YAML syntax error"),
    Bad("yaml-tab", WS + "job: echo\ncomputing:\n\tminimum_num_gpus: 1\n", 4, None, "YAML syntax error"),
    Bad("yaml-two-documents", WS + "job: echo\n---\njob: again\n", 3, None, "another document"),
    Bad("workspace-missing", "job: echo\nworkspace: nowhere\n", 2, "workspace", "directory not found"),
    Bad("workspace-is-a-file", "job: echo\n\nworkspace: ws\n", 3, "workspace", "is not a directory",
        setup="ws-file"),
    Bad("top-level-list", "- workspace: ws\n- job: echo\n", 1, None, "got a list"),
    Bad("top-level-scalar", "just some words\n", 1, None, "got a str"),
    Bad("empty-file", "", 1, None, "got nothing"),
    Bad("only-comments", "# nothing here\n\n", 1, None, "got nothing"),
    Bad("duplicate-key", WS + "job: echo\ncomputing:\n  minimum_num_gpus: 1\n  minimum_num_gpus: 2\n", 5,
        "computing.minimum_num_gpus", "duplicate key (first defined on line 4)"),
    Bad("duplicate-top-key", WS + "job: echo\njob: again\n", 3, "job", "duplicate key (first defined on line 2)"),
    Bad("bad-cost", WS + "job: echo\ncomputing:\n  maximum_cost_per_hour: $abc\n", 4,
        "computing.maximum_cost_per_hour", '"$abc"'),
    Bad("bad-containerize", WS + "job: echo\ncontainerize: maybe\n", 3, "containerize", "true or false"),
    Bad("negative-num-nodes", WS + "job: echo\nnum_nodes: -2\n", 3, "num_nodes", "greater than or equal to 1"),
    Bad("retry-scalar", WS + "job: echo\nretry: 3\n", 3, "retry", "expected a mapping"),
    Bad("retry-zero-attempts", WS + "job: echo\nretry:\n  max_attempts: 0\n", 4, "retry.max_attempts",
        "greater than or equal to 1"),
    Bad("bad-max-duration", WS + "job: echo\nmax_duration: soon\n", 3, "max_duration", '"soon"'),
    Bad("envs-as-list", WS + "job: echo\nenvs:\n  - A=1\n  - B=2\n", 3, "envs", "expected a mapping, got a list"),
    Bad("non-utf8", b"workspace: ws\njob: echo caf\xe9\n", None, None, "not a UTF-8 text file"),
    Bad("nul-character", WS + "job: echo\x00\n", 2, None, "unacceptable character"),
    Bad("no-such-file", None, None, None, "file not found", file="missing.yaml"),
    Bad("job-is-a-directory", None, None, None, "is a directory", file="ws"),
    Bad("job-as-number", WS + "job: 42\n", 2, "job", "expected a string, got 42"),
    Bad("job-run-on-posix-number", WS + "job:\n  run_on_posix: 7\n", 3, "job.run_on_posix", "expected a string"),
    Bad("computing-scalar", WS + "job: echo\ncomputing: lots\n", 3, "computing", 'expected a mapping, got "lots"'),
    Bad("unknown-image-pull-policy", WS + "job: echo\nimage_pull_policy: Sometimes\n", 3, "image_pull_policy",
        '"Sometimes"'),
    Bad("unknown-device-type", WS + "job: echo\ncomputing:\n  device_type: TPU\n", 4, "computing.device_type",
        '"TPU"'),
    Bad("federate-empty-server-job", WS + "job: echo\njob_type: federate\nserver_job: ''\n", 4, "server_job",
        "must not be empty"),
    Bad("env-arg-without-equals", WS + "job: echo\n", None, None, 'expected NAME=VALUE, got "NOEQUALS"',
        args=["--env", "NOEQUALS"]),
    Bad("env-arg-bad-name", WS + "job: echo\n", None, None, '"1X" is not a valid variable name', args=["-e", "1X=2"]),
    Bad("env-arg-empty-name", WS + "job: echo\n", None, None, '"" is not a valid variable name', args=["-e", "=2"]),
    Bad("envs-value-too-long", WS + "job: echo\nenvs:\n  X: " + "v" * 140_000 + "\n", 3, "envs",
        "X: the value is longer than the system allows"),
    Bad("envs-bad-name", WS + 'job: echo\nenvs: {"A=B": 1}\n', 3, "envs", '"A=B" is not a valid variable name'),
    Bad("job-nul", WS + 'job: "echo \\0"\n', 2, "job", "contains a NUL character"),
    Bad("max-duration-inf", WS + "job: echo\nmax_duration: .inf\n", 3, "max_duration", "at most 10 years"),
    Bad("workspace-root", "workspace: /\njob: echo\n", None, "workspace", "is the root of the filesystem"),
    Bad("alias-bomb", "job: echo\na: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True)), 2, None,
        "alias bomb"),
    Bad("alias-recursive", "job: echo\nx: &a [*a]\n", 2, None, "recursive alias"),
    Bad("nested-too-deep", "job: echo\nx: " + "[" * 5000 + "]" * 5000 + "\n", None, None, "nested deeper than 64"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b.id for b in BAD])
def test_malformed_job_exits_2_with_one_line(bad: Bad, fedml: Fedml, tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    if bad.setup == "ws-file":
        (job_dir / "ws").write_text("not a directory\n")
    else:
        (job_dir / "ws").mkdir()
    if bad.text is not None:
        path = job_dir / bad.file
        if isinstance(bad.text, bytes):
            path.write_bytes(bad.text)
        else:
            path.write_text(bad.text)

    r = fedml("launch", bad.file, "--dry-run", *bad.args, cwd=job_dir, timeout=60)

    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    msg = lines[0]
    assert msg.startswith("error: "), msg
    if bad.exact is not None:
        assert msg == bad.exact
    if bad.args:
        assert msg.startswith(f"error: {bad.args[0] if bad.args[0] != '-e' else '--env'}: "), msg
    else:
        where = f"{bad.file}:{bad.line}" if bad.line is not None else bad.file
        prefix = f"error: {where}: {bad.field}: " if bad.field else f"error: {where}: "
        assert msg.startswith(prefix), msg
        if bad.line is None:
            assert not re.match(rf"error: {re.escape(bad.file)}:\d+:", msg), msg
    assert bad.fragment in msg, msg
    assert_nothing_submitted(fedml)


def test_malformed_cases_are_many() -> None:
    assert len(BAD) >= 20 and len({b.id for b in BAD}) == len(BAD)


def test_error_names_the_path_as_given(fedml: Fedml, tmp_path: Path) -> None:
    sub = tmp_path / "deep" / "dir"
    sub.mkdir(parents=True)
    (sub / "ws").mkdir()
    (sub / "my job.yaml").write_text(WS + "job: echo\ncomputing:\n  minimum_num_gpus: two\n")
    r = fedml("launch", "deep/dir/my job.yaml", "--dry-run", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == ('error: deep/dir/my job.yaml:4: computing.minimum_num_gpus: expected an integer, '
                        'got "two"\n')
    abs_path = sub / "my job.yaml"
    r = fedml("launch", str(abs_path), "--dry-run")
    assert r.returncode == 2 and r.stderr.startswith(f"error: {abs_path}:4: computing.minimum_num_gpus: ")
    assert_nothing_submitted(fedml)


def test_without_dry_run_validation_still_comes_first(fedml: Fedml, tmp_path: Path) -> None:
    """A bad file is refused before any scheduler is started or contacted."""
    (tmp_path / "job.yaml").write_text("job: echo\nnum_nodes: -1\n")
    r = fedml("launch", "job.yaml", "--detach", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: job.yaml:2: num_nodes: ")
    assert_nothing_submitted(fedml)


# ---- dry run output ----------------------------------------------------------------------------------------

JOB = """\
workspace: ws
job: |
  echo "dataset is $FEDML_ENV_DATA_ARGS_DATASET_NAME"
job_type: train
job_subtype: generate_training
computing:
  minimum_num_gpus: 1
  maximum_cost_per_hour: $3000
  resource_type: RTX-4090
  allow_cross_cloud_resources: true
data_args:
  dataset_name: mnist
  dataset_path: ./dataset
model_args:
  input_dim: '784'
  layers: [1, 2]
fedml_env:
  federate_project_name: Cheetah
envs:
  MY_VAR: 1
run_api_key: my_api_key
"""


def test_dry_run_json(fedml: Fedml, tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "train.yaml").write_text(JOB)
    r = fedml("launch", "train.yaml", "--dry-run", "--json", "--env", "EXTRA=a=b", "--name", "mine",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["file"] == str((tmp_path / "train.yaml").resolve())
    assert out["name"] == "mine"
    assert out["workspace_dir"] == str((tmp_path / "ws").resolve())
    job = out["job"]
    assert job["job_type"] == "train" and job["job_subtype"] == "generate_training"
    assert job["computing"]["maximum_cost_per_hour"] == 3000.0
    assert isinstance(job["computing"]["maximum_cost_per_hour"], float)
    assert job["computing"]["minimum_num_gpus"] == 1
    assert job["computing"]["resource_type"] == "RTX-4090"
    assert job["computing"]["allow_cross_cloud_resources"] is True   # unknown keys kept
    assert job["run_api_key"] == "my_api_key"
    assert job["data_args"] == {"dataset_name": "mnist", "dataset_path": "./dataset"}
    assert job["envs"] == {"MY_VAR": "1"}
    assert job["job"].startswith('echo "dataset is')
    assert out["env"] == {"EXTRA": "a=b"}
    exported = out["exported_env"]
    assert exported["FEDML_ENV_DATA_ARGS_DATASET_NAME"] == "mnist"
    assert exported["FEDML_ENV_DATA_ARGS_DATASET_PATH"] == "./dataset"
    assert exported["FEDML_ENV_MODEL_ARGS_INPUT_DIM"] == "784"
    assert json.loads(exported["FEDML_ENV_MODEL_ARGS_LAYERS"]) == [1, 2]
    assert exported["FEDML_ENV_FEDERATE_PROJECT_NAME"] == "Cheetah"
    assert exported["FEDML_ENV_RUN_API_KEY"] == "my_api_key"
    assert not any(k.startswith("FEDML_ENV_COMPUTING") for k in exported)
    assert_nothing_submitted(fedml)


def test_dry_run_plain_is_yaml(fedml: Fedml, tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "train.yaml").write_text(JOB)
    r = fedml("launch", "train.yaml", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first, _, rest = r.stdout.partition("\n")
    assert first == "# train.yaml: valid (dry run, nothing submitted)"
    doc = yaml.safe_load(rest)
    assert doc["name"] == "train"
    assert doc["job"]["computing"]["maximum_cost_per_hour"] == 3000.0
    assert doc["exported_env"]["FEDML_ENV_DATA_ARGS_DATASET_NAME"] == "mnist"
    assert_nothing_submitted(fedml)


def test_dry_run_compat_hello_job_json(fedml: Fedml, tmp_path: Path) -> None:
    src = COMPAT / "launch" / "hello_job.yaml"
    needs("the FedML compatibility corpus", src.is_file(), f"{src} is missing")
    shutil.copyfile(src, tmp_path / "hello_job.yaml")
    (tmp_path / "hello_world").mkdir()
    r = fedml("launch", "hello_job.yaml", "--dry-run", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["job"]["computing"]["maximum_cost_per_hour"] == 3000.0
    assert out["job"]["job_subtype"] == "generate_training"
    assert out["exported_env"]["FEDML_ENV_DATA_ARGS_DATASET_NAME"] == "mnist"
    assert out["exported_env"]["FEDML_ENV_TRAINING_PARAMS_LEARNING_RATE"] == "0.004"
    assert_nothing_submitted(fedml)


def test_typos_warn_with_a_suggestion_and_strict_makes_them_errors(fedml: Fedml, tmp_path: Path) -> None:
    """`computing: {minimum_num_gpu: 1}` once launched with 0 GPUs and said nothing."""
    (tmp_path / "ws").mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(WS + "job: echo hi\ncomputing:\n  minimum_num_gpu: 1\n  allow_cross_cloud_resources: true\n"
                        "job_typ: train\nretry:\n  max_attempt: 3\nmy_own_setting: 5\n")
    r = fedml("launch", str(job), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        f"warning: {job}:4: computing.minimum_num_gpu: unknown key (did you mean minimum_num_gpus?)",
        f"warning: {job}:6: job_typ: unknown key (did you mean job_type?)",
        f"warning: {job}:8: retry.max_attempt: unknown key (did you mean max_attempts?)",
    ], r.stderr
    strict = fedml("launch", str(job), "--strict")
    assert strict.returncode == 2 and strict.stderr.count("error: ") == 3, strict.stderr
    assert "Traceback" not in strict.stderr
    assert_nothing_submitted(fedml)


def test_a_flood_of_unknown_keys_gets_a_bounded_warning(fedml: Fedml, tmp_path: Path) -> None:
    """A hostile file: 5,000 unknown keys in `computing`, one of them 100 KB long."""
    (tmp_path / "ws").mkdir()
    keys = f"  ? {'x' * 100_000}\n  : 1\n" + "".join(f"  k{i}: 1\n" for i in range(5000))  # the long one first
    job = tmp_path / "job.yaml"
    job.write_text(WS + "job: echo hi\ncomputing:\n" + keys)
    r = fedml("launch", str(job), "--dry-run")
    assert r.returncode == 0, r.stderr[:500]
    lines = r.stderr.splitlines()
    assert len(lines) == 21 and lines[-1] == f"warning: {job}: 4981 more unknown keys not shown", lines[-3:]
    assert "xxx..." in lines[0] and max(len(x) for x in lines) < 1000
