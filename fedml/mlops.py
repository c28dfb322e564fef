"""FedML's job-side reporting (`fedml.mlops`, and `fedml.log`), for jobs that fedml launch runs: metrics go to the
run's own output as `FEDML_METRIC {...}` lines (the scheduler reads them out of the stored log:
scheduler/contract/metrics.py; `fedml run metrics RUN`), artifacts into $FEDML_ARTIFACT_DIR (kept as the run's
artifacts when the rank ends: `fedml run artifacts RUN`). Nothing is sent from here and nothing waits on the
network. Only the standard library (and our wire format): importing it costs milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from scheduler.contract.metrics import line as _metric_line

ARTIFACT_TYPE_NAME_GENERAL = "general"
ARTIFACT_TYPE_NAME_MODEL = "model"
ARTIFACT_TYPE_NAME_DATASET = "dataset"
ARTIFACT_TYPE_NAME_SOURCE = "source"
ARTIFACT_TYPE_NAME_LOG = "log"
_TYPES = (ARTIFACT_TYPE_NAME_GENERAL, ARTIFACT_TYPE_NAME_MODEL, ARTIFACT_TYPE_NAME_DATASET, ARTIFACT_TYPE_NAME_SOURCE,
          ARTIFACT_TYPE_NAME_LOG)
MANIFEST = "fedml-artifacts.json"  # in $FEDML_ARTIFACT_DIR: each named artifact's type and files
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def log(metrics: dict[str, Any], step: int | None = None, customized_step_key: str | None = None,
        commit: bool = True, **_: Any) -> None:
    """Report metrics ({"loss": 0.3, "acc": 0.9}) at `step` (or at the value of the metric named
    `customized_step_key`, e.g. "round_idx"): one FEDML_METRIC line on standard output. `commit` is FedML's and
    changes nothing here (every call is kept)."""
    values = dict(metrics)
    if customized_step_key is not None and step is None and customized_step_key in values:
        step = int(values[customized_step_key])
    sys.stdout.write(_metric_line(values, step) + "\n")
    sys.stdout.flush()


def log_metric(metrics: dict[str, Any], step: int | None = None, customized_step_key: str | None = None,
               **kw: Any) -> None:
    """FedML's other name for log()."""
    log(metrics, step=step, customized_step_key=customized_step_key, **kw)


class Artifact:
    """Files and folders kept together under a name and a type (`ARTIFACT_TYPE_NAME_*`), as FedML's."""

    def __init__(self, name: str, type: str = ARTIFACT_TYPE_NAME_GENERAL) -> None:  # noqa: A002 - FedML's name
        if not _SAFE.match(str(name)):
            raise ValueError(f"artifact name {name!r}: letters, digits, _ . - (at most 100), not a path")
        if type not in _TYPES:
            raise ValueError(f"artifact type {type!r}: one of {', '.join(_TYPES)}")
        self.artifact_name, self.artifact_type = str(name), type
        self.files: list[Path] = []
        self.dirs: list[Path] = []

    def add_file(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"artifact {self.artifact_name}: no file {p}")
        self.files.append(p)

    def add_dir(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"artifact {self.artifact_name}: no folder {p}")
        self.dirs.append(p)


def log_artifact(artifact: Artifact, version: str | None = None, run_id: str | None = None,
                 edge_id: str | None = None) -> Path | None:
    """Copy the artifact's files into $FEDML_ARTIFACT_DIR/<name>/ and name its type in fedml-artifacts.json there;
    the scheduler keeps them with the run when the rank ends. Outside a run (no FEDML_ARTIFACT_DIR) it says so
    on standard error and keeps nothing. Returns where they went."""
    root = os.environ.get("FEDML_ARTIFACT_DIR")
    if not root:
        sys.stderr.write(f"fedml.mlops.log_artifact({artifact.artifact_name}): not in a fedml launch run "
                         "(FEDML_ARTIFACT_DIR is not set): nothing kept\n")
        return None
    dest = Path(root) / artifact.artifact_name
    dest.mkdir(parents=True, exist_ok=True)
    kept: list[str] = []
    for f in artifact.files:
        shutil.copy2(f, dest / f.name)
        kept.append(f.name)
    for d in artifact.dirs:
        shutil.copytree(d, dest / d.name, symlinks=True, dirs_exist_ok=True)  # (links copied as links)
        kept.append(d.name + "/")
    manifest = Path(root) / MANIFEST
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, ValueError):
        doc = {}
    doc[artifact.artifact_name] = {"type": artifact.artifact_type, "files": kept,
                                   **({"version": version} if version else {})}
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, manifest)
    return dest


def log_model(model_name: str, model_file_path: str | os.PathLike[str], version: str | None = None) -> Path | None:
    """Keep a model file (or folder) as an artifact of type "model"."""
    a = Artifact(model_name, ARTIFACT_TYPE_NAME_MODEL)
    (a.add_dir if Path(model_file_path).is_dir() else a.add_file)(model_file_path)
    return log_artifact(a, version=version)


def log_artifact_file(name: str, path: str | os.PathLike[str], type: str = ARTIFACT_TYPE_NAME_GENERAL) -> Path | None:  # noqa: A002
    a = Artifact(name, type)
    a.add_file(path)
    return log_artifact(a)
