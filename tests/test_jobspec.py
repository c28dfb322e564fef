"""Unit tests of scheduler.contract.jobspec (the job YAML model) and placement.gpu_matches: fast, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.contract.jobload import load_file, load_text, validate
from scheduler.contract.jobspec import JobSpec, JobSpecError, parse_duration
from scheduler.placement import gpu_matches

pytestmark = pytest.mark.unit  # in process, no servers: `make test-unit` (under 10 s)


def err(text: str, file: str = "job.yaml") -> JobSpecError:
    with pytest.raises(JobSpecError) as info:
        load_text(text, file=file)
    return info.value


# ---- errors: one line, file:line: field: message ------------------------------------------------------------

def test_bad_integer_names_file_line_field_and_value() -> None:
    e = err("workspace: ws\njob: echo hi\ncomputing:\n  minimum_num_gpus: two\n")
    assert str(e) == 'job.yaml:4: computing.minimum_num_gpus: expected an integer, got "two"'
    assert (e.file, e.line, e.field) == ("job.yaml", 4, "computing.minimum_num_gpus")


def test_line_numbers_count_comments_and_blank_lines() -> None:
    text = "# a FedML job\n\n# more comments\njob: |\n  echo a\n  echo b\n\n# type\njob_type: magic\n"
    e = err(text, file="x/my.yaml")
    assert e.line == 9 and e.field == "job_type"
    assert str(e).startswith("x/my.yaml:9: job_type: expected one of ")
    assert '"magic"' in str(e)


def test_first_problem_in_file_order_is_reported_with_a_count_of_the_rest() -> None:
    text = "job: echo\nnum_nodes: 0\npriority: x\ncomputing:\n  minimum_num_gpus: -1\n"
    e = err(text)
    assert e.line == 2 and e.field == "num_nodes"
    assert str(e).endswith("(and 2 more problems)")


@pytest.mark.parametrize("text,line,field,fragment", [
    ("workspace: ws\njob_type: train\n", 1, "job", "required"),
    ("workspace: ws\njob: ''\n", 2, "job", "required"),
    ("workspace: ws\njob:\n", 2, "job", "required"),
    ("job: |\n\nbootstrap: echo\n", 1, "job", "required"),
    ("job:\n  run_on_windows: echo win\n", 1, "job", "required"),
    ("job: 42\n", 1, "job", "expected a string, got 42"),
    ("job: [a, b]\n", 1, "job", "expected a string, got a list"),
    ("job:\n  run_on_posix: 3\n", 2, "job.run_on_posix", "expected a string, got 3"),
    ("job: echo\ncomputing: big\n", 2, "computing", 'expected a mapping, got "big"'),
    ("job: echo\ncomputing:\n  maximum_cost_per_hour: $abc\n", 3, "computing.maximum_cost_per_hour",
     '"$abc"'),
    ("job: echo\ncomputing:\n  device_type: TPU\n", 3, "computing.device_type", '"TPU"'),
    ("job: echo\ncomputing:\n  minimum_num_gpus: 1.5\n", 3, "computing.minimum_num_gpus", "an integer"),
    ("job: echo\ncontainerize: maybe\n", 2, "containerize", 'expected true or false, got "maybe"'),
    ("job: echo\nnum_nodes: -1\n", 2, "num_nodes", "greater than or equal to 1"),
    ("job: echo\nretry: 3\n", 2, "retry", "expected a mapping"),
    ("job: echo\nretry:\n  max_attempts: 0\n", 3, "retry.max_attempts", "greater than or equal to 1"),
    ("job: echo\nmax_duration: soon\n", 2, "max_duration", '"soon"'),
    ("job: echo\nmax_duration: -5\n", 2, "max_duration", "positive"),
    ("job: echo\nenvs:\n  - A=1\n", 2, "envs", "expected a mapping, got a list"),
    ("job: echo\nenvs:\n  A:\n    b: 1\n", 2, "envs", "A: expected a plain value"),
    ("job: echo\nimage_pull_policy: Sometimes\n", 2, "image_pull_policy", '"Sometimes"'),
    ("job: echo\ndocker: ubuntu\n", 2, "docker", "expected a mapping"),
    ("job: echo\ndocker:\n  ports: [x]\n", 3, "docker.ports.0", "expected an integer"),
    ("job: echo\nservice:\n  port: 70000\n", 3, "service.port", "less than or equal to 65535"),
    ("job: echo\njob_type: federate\nserver_job: ''\n", 3, "server_job", "must not be empty"),
    ("job: echo\ncomputing:\n  minimum_num_gpus: 1\n  minimum_num_gpus: 2\n", 4,
     "computing.minimum_num_gpus", "duplicate key (first defined on line 3)"),
    ("job: echo\njob: echo2\n", 2, "job", "duplicate key (first defined on line 1)"),
])
def test_field_errors(text: str, line: int, field: str, fragment: str) -> None:
    e = err(text)
    assert (e.line, e.field) == (line, field), str(e)
    assert fragment in str(e)
    assert str(e).startswith(f"job.yaml:{line}: {field}: ")
    assert "\n" not in str(e)


@pytest.mark.parametrize("text,line,fragment", [
    ("job: echo\nlabels: [a, b\n", 2, "YAML syntax error"),          # unclosed bracket: where it opened
    ("job: echo\nlabels: {a: b\n\n\n", 2, "YAML syntax error"),      # not past the end of the file
    ('job: "echo\n', 1, "YAML syntax error"),                          # unclosed quote
    ("job: echo\ncomputing:\n  minimum_num_gpus: 1\n    resource_type: x\n", 4, "YAML syntax error"),
    ("job: echo\ncomputing:\n    minimum_num_gpus: 1\n  resource_type: x\n", 4, "YAML syntax error"),
    ("job: echo\ncomputing:\n\tminimum_num_gpus: 1\n", 3, "'\\t'"),      # a tab
    ("job: echo\n---\njob: echo\n", 2, "another document"),
    ("a: &x 1\njob: echo\nc: *y\n", 3, "undefined alias"),
    ("job: echo\x00\n", 1, "unacceptable character"),
    ("- job: echo\n", 1, "got a list"),
    ("", 1, "got nothing"),
    ("# only a comment\n", 1, "got nothing"),
    ("hello\n", 1, "got a str"),
])
def test_document_errors(text: str, line: int, fragment: str) -> None:
    e = err(text)
    assert e.line == line, str(e)
    assert fragment in str(e)
    assert str(e).startswith(f"job.yaml:{line}: ")


def test_validate_without_lines_and_non_mapping() -> None:
    with pytest.raises(JobSpecError, match="got a int"):
        validate(5)
    with pytest.raises(JobSpecError) as info:
        validate({"job": "echo", "num_nodes": "many"})
    assert info.value.line is None and info.value.field == "num_nodes"


# ---- what valid files mean ----------------------------------------------------------------------------------

@pytest.mark.parametrize("price,value", [
    ("$3000", 3000.0), ("$10", 10.0), ("$1.5", 1.5), ('"$2,500"', 2500.0), ("3.25", 3.25), ("7", 7.0),
    ("' $4 '", 4.0),
])
def test_prices(price: str, value: float) -> None:
    spec = load_text(f"job: echo\ncomputing:\n  maximum_cost_per_hour: {price}\n")
    assert spec.computing.maximum_cost_per_hour == value


def test_negative_price_refused() -> None:
    e = err("job: echo\ncomputing:\n  maximum_cost_per_hour: $-3\n")
    assert e.field == "computing.maximum_cost_per_hour"


def test_fedml_defaults_and_unknown_keys_kept() -> None:
    spec = load_text("job: echo hi\njob_subtype: generate_training\nrun_api_key: k\nweird:\n  nested: [1, 2]\n")
    assert spec.job_type == "train" and spec.job_subtype == "generate_training"
    assert spec.free_keys() == {"run_api_key": "k", "weird": {"nested": [1, 2]}}
    assert spec.num_nodes == 1 and spec.retry.max_attempts == 1 and spec.computing.minimum_num_gpus == 0
    assert spec.commands() == "echo hi"


@pytest.mark.parametrize("text,expected", [
    ("task_type: train\n", "train"),
    ("task_type: serve\n", "serve"),
    ("task_type: Deploy\n", "deploy"),
    ("task_type: dev-environment\n", "train"),       # not one of ours: default, key kept
    ("task_type: serve\njob_type: federate\n", "federate"),  # job_type wins
    ("job_type: ' SERVE '\n", "serve"),
])
def test_task_type_alias(text: str, expected: str) -> None:
    spec = load_text("job: echo\n" + text)
    assert spec.job_type == expected


def test_task_type_kept_as_free_key_when_not_a_job_type() -> None:
    spec = load_text("job: echo\ntask_type: dev-environment\n")
    assert spec.fedml_env_vars()["FEDML_ENV_TASK_TYPE"] == "dev-environment"


@pytest.mark.parametrize("text,expected", [
    ("docker:\n  image: fedml/x:1\n", True),  # FedML: a job with an image runs in it
    ("docker:\n  image: fedml/x:1\ncontainerize: false\n", False),  # unless the file says not to
    ("docker:\n  image: ''\n", False),
    ("docker:\n  registry: r\n", False),
    ("", False),
])
def test_containerize_follows_docker_image_unless_given(text: str, expected: bool) -> None:
    spec = load_text("job: echo\n" + text)
    assert spec.containerize is expected
    assert JobSpec.model_validate_json(spec.model_dump_json()).containerize is expected  # as stored, read back


def test_a_stored_job_is_read_from_its_json_without_a_python_round_trip() -> None:
    """Every run read back from a store parses its job. A validator of the whole input (mode "before" or
    "wrap") makes pydantic build the input as Python objects first and validate those; a private attribute
    costs a set-up per object. Together they were 10 us of a 23 us read (docs/benchmarks.md)."""
    from scheduler.contract.jobspec import _Model

    models = [JobSpec, *_Model.__subclasses__()]
    for model in models:
        modes = [d.info.mode for d in model.__pydantic_decorators__.model_validators.values()]
        assert not {"before", "wrap"} & set(modes), f"{model.__name__}: a model validator of mode before/wrap"
    assert not JobSpec.__private_attributes__


def test_run_on_posix_form() -> None:
    spec = load_text("job:\n  run_on_windows: echo win\n  run_on_posix: |\n    echo posix\n    echo two\n"
                     "bootstrap:\n  run_on_windows: echo wb\n  run_on_posix: echo pb\n"
                     "server_job:\n  run_on_posix: echo server\n")
    assert spec.commands() == "echo posix\necho two\n"
    assert spec.bootstrap_commands() == "echo pb"
    assert "win" not in spec.commands()


def test_job_args_without_job_is_valid() -> None:
    spec = load_text("job_args:\n  job_id: 2176\n  config_id: 308\n")
    assert spec.commands() == ""
    assert spec.fedml_env_vars()["FEDML_ENV_JOB_ARGS_JOB_ID"] == "2176"


def test_fedml_env_vars_flattening() -> None:
    spec = load_text(
        "job: echo\n"
        "computing:\n  minimum_num_gpus: 1\n"
        "data_args:\n  dataset_name: mnist\n  dataset-path: ./data\n  nested:\n    deep: 3\n"
        "model_args:\n  input_dim: '784'\n  flags: [a, 1]\n  on_gpu: true\n  off: false\n  nothing:\n"
        "fedml_env:\n  federate_project_name: Cheetah\n"
        "serving_args:\n  model_name: demo\n"
        "environment_args:\n  bootstrap: bootstrap.sh\n"
        "learning.rate: 0.1\n"
        "envs:\n  MINE: x\n"
    )
    env = spec.fedml_env_vars()
    assert env["FEDML_ENV_DATA_ARGS_DATASET_NAME"] == "mnist"
    assert env["FEDML_ENV_DATA_ARGS_DATASET_PATH"] == "./data"
    assert env["FEDML_ENV_DATA_ARGS_NESTED_DEEP"] == "3"
    assert env["FEDML_ENV_MODEL_ARGS_INPUT_DIM"] == "784"
    assert env["FEDML_ENV_MODEL_ARGS_FLAGS"] == '["a", 1]'
    assert env["FEDML_ENV_MODEL_ARGS_ON_GPU"] == "true"
    assert env["FEDML_ENV_MODEL_ARGS_NOTHING"] == ""
    assert env["FEDML_ENV_FEDERATE_PROJECT_NAME"] == "Cheetah"      # not FEDML_ENV_FEDML_ENV_...
    assert env["FEDML_ENV_SERVING_ARGS_MODEL_NAME"] == "demo"
    assert env["FEDML_ENV_ENVIRONMENT_ARGS_BOOTSTRAP"] == "bootstrap.sh"
    assert env["FEDML_ENV_LEARNING_RATE"] == "0.1"
    # Interpreted keys are not exported; envs are the job's own variables, not FEDML_ENV_*.
    assert not any(k.startswith(("FEDML_ENV_COMPUTING", "FEDML_ENV_JOB_TYPE", "FEDML_ENV_ENVS")) for k in env)
    assert spec.envs == {"MINE": "x"}
    assert all(k == k.upper() and k.startswith("FEDML_ENV_") for k in env)


def test_envs_and_labels_stringified() -> None:
    spec = load_text("job: echo\nenvs:\n  A: 1\n  B: true\n  C:\n  D: x\nlabels:\n  1: 2\n")
    assert spec.envs == {"A": "1", "B": "true", "C": "", "D": "x"}
    assert spec.labels == {"1": "2"}


def test_retry_on_key() -> None:
    spec = load_text("job: echo\nretry:\n  max_attempts: 3\n  on: [lost, error]\n")
    assert spec.retry.max_attempts == 3 and spec.retry.on == ["lost", "error"]


def test_yes_no_on_off_stay_strings() -> None:
    # YAML 1.2 booleans only: FedML files with yes/no values keep them as text.
    spec = load_text("job: echo\nflags:\n  on: yes\n  off: no\n")
    assert spec.fedml_env_vars() == {"FEDML_ENV_FLAGS_ON": "yes", "FEDML_ENV_FLAGS_OFF": "no"}


@pytest.mark.parametrize("value,seconds", [
    (None, None), (3600, 3600.0), (1.5, 1.5), ("3600", 3600.0), ("90s", 90.0), ("30m", 1800.0),
    ("2h", 7200.0), ("1d", 86400.0), (" 1.5h ", 5400.0), ("10 m", 600.0),
])
def test_parse_duration(value: object, seconds: float | None) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "0", "0m", "-5m", "5w", "h", "", 0, -1, True, False, "1.2.3h"])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_max_duration_in_spec() -> None:
    assert load_text("job: echo\nmax_duration: 30m\n").max_duration == 1800.0
    assert load_text("job: echo\n").max_duration is None


# ---- load_file ----------------------------------------------------------------------------------------------

def test_a_workspace_with_a_nul_character_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Found by test_fuzz's YAML grammar in CI: a NUL in `workspace` reached the OS (ValueError, a traceback)."""
    (tmp_path / "job.yaml").write_text('job: echo\nworkspace: "ws\\x00x"\n')
    with pytest.raises(JobSpecError) as e:
        load_file(tmp_path / "job.yaml")
    assert str(e.value) == f"{tmp_path / 'job.yaml'}:2: workspace: contains a NUL character (no path can)"


def test_load_file_resolves_workspace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "ws").mkdir()
    (tmp_path / "job.yaml").write_text("workspace: ws\njob: echo\n")
    loaded = load_file(tmp_path / "job.yaml")
    assert loaded.workspace_dir == (tmp_path / "ws").resolve()
    (tmp_path / "none.yaml").write_text("workspace:\njob: echo\n")
    assert load_file(tmp_path / "none.yaml").workspace_dir is None
    (tmp_path / "dot.yaml").write_text("workspace: .\njob: echo\n")
    assert load_file(tmp_path / "dot.yaml").workspace_dir == tmp_path.resolve()


def test_load_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "job.yaml"
    p.write_text("# c\njob: echo\nworkspace: missing\n")
    with pytest.raises(JobSpecError) as info:
        load_file(p)
    assert (info.value.line, info.value.field) == (3, "workspace")
    assert "directory not found" in str(info.value)
    p.write_bytes(b"job: echo \xff\n")
    with pytest.raises(JobSpecError, match="not a UTF-8 text file"):
        load_file(p)
    with pytest.raises(JobSpecError, match="file not found"):
        load_file(tmp_path / "nope.yaml")
    with pytest.raises(JobSpecError, match="is a directory"):
        load_file(tmp_path)


# ---- GPU names ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wanted,name,ok", [
    ("A100-80G", "NVIDIA A100 80GB PCIe", True),
    ("A100-80G", "NVIDIA A100-SXM4-80GB", True),
    ("A100-80GB-SXM", "NVIDIA A100-SXM4-80GB", True),
    ("A100", "NVIDIA A100-SXM4-40GB", True),
    ("TESLA_T4", "Tesla T4", True),
    ("T4", "Tesla T4", True),
    ("RTX-4090", "NVIDIA GeForce RTX 4090", True),
    ("rtx_4090", "NVIDIA GeForce RTX 4090", True),
    ("H100", "NVIDIA H100 80GB HBM3", True),
    (None, "anything", True),
    ("", "anything", True),
    ("A100-80G", "NVIDIA H100 80GB HBM3", False),
    ("A100-80G", "NVIDIA A100-SXM4-40GB", False),
    ("RTX-4090", "NVIDIA GeForce RTX 3090", False),
    ("TESLA_T4", "Tesla V100-SXM2-16GB", False),
    ("H100", "NVIDIA A100 80GB PCIe", False),
])
def test_gpu_matches(wanted: str | None, name: str, ok: bool) -> None:
    assert gpu_matches(wanted, name) is ok


# NVML's names of current NVIDIA parts, and which resource_type tokens each must (and only it must) match.
NVML_NAMES = {
    "A10": "NVIDIA A10", "A10G": "NVIDIA A10G",
    "A100-40G-PCIE": "NVIDIA A100-PCIE-40GB", "A100-80G-PCIE": "NVIDIA A100 80GB PCIe",
    "A100-40G-SXM": "NVIDIA A100-SXM4-40GB", "A100-80G-SXM": "NVIDIA A100-SXM4-80GB",
    "H100-PCIE": "NVIDIA H100 PCIe", "H100-SXM": "NVIDIA H100 80GB HBM3", "H100-NVL": "NVIDIA H100 NVL",
    "H200": "NVIDIA H200", "L4": "NVIDIA L4", "L40": "NVIDIA L40", "L40S": "NVIDIA L40S", "T4": "Tesla T4",
    "V100": "Tesla V100-SXM2-16GB", "V100S": "Tesla V100S-PCIE-32GB", "RTX-3090": "NVIDIA GeForce RTX 3090",
    "RTX-4090": "NVIDIA GeForce RTX 4090", "RTX-6000-ADA": "NVIDIA RTX 6000 Ada Generation", "B200": "NVIDIA B200",
    "T400": "NVIDIA T400",
}
# wanted -> the parts above it matches; every other part must not match
GPU_TABLE = {
    "A10": {"A10"}, "A10G": {"A10G"}, "L4": {"L4"}, "L40": {"L40"}, "L40S": {"L40S"}, "T4": {"T4"},
    "T400": {"T400"}, "V100": {"V100"}, "V100S": {"V100S"}, "B200": {"B200"}, "H200": {"H200"},
    "A100": {"A100-40G-PCIE", "A100-80G-PCIE", "A100-40G-SXM", "A100-80G-SXM"},
    "A100-80G": {"A100-80G-PCIE", "A100-80G-SXM"}, "A100-80GB": {"A100-80G-PCIE", "A100-80G-SXM"},
    "A100-40G": {"A100-40G-PCIE", "A100-40G-SXM"}, "A100-SXM": {"A100-40G-SXM", "A100-80G-SXM"},
    "A100-80GB-SXM": {"A100-80G-SXM"}, "A100_PCIE_40GB": {"A100-40G-PCIE"},
    "H100": {"H100-PCIE", "H100-SXM", "H100-NVL"}, "H100-SXM": {"H100-SXM"}, "H100-80GB-HBM3": {"H100-SXM"},
    "H100-PCIE": {"H100-PCIE"}, "H100-NVL": {"H100-NVL"}, "TESLA_T4": {"T4"},
    "RTX-4090": {"RTX-4090"}, "rtx 3090": {"RTX-3090"}, "RTX-6000-Ada": {"RTX-6000-ADA"},
}


@pytest.mark.parametrize("wanted", sorted(GPU_TABLE))
def test_gpu_names_match_whole_tokens_against_real_nvml_names(wanted: str) -> None:
    got = {part for part, name in NVML_NAMES.items() if gpu_matches(wanted, name)}
    assert got == GPU_TABLE[wanted], (wanted, got)


def test_a_lone_surrogate_escape_is_a_clear_error_naming_the_field(tmp_path: Path) -> None:
    """YAML's "\\ud800" escape gives a string no text encoding takes (pydantic could not even quote it)."""
    path = tmp_path / "j.yaml"
    path.write_text('job: echo hi\nmax_duration: "\\ud800\\udc00"\n')
    with pytest.raises(JobSpecError, match="max_duration: holds a lone surrogate") as e:
        load_file(str(path))
    assert ":2:" in str(e.value)
