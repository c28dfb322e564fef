"""FedML's workflows (`fedml.workflow`) over fedml launch: jobs with dependencies, run as a DAG.

    from fedml.workflow import Workflow, TrainJob
    prep, train, report = TrainJob("prep", "prep.yaml"), TrainJob("train", "train.yaml"), TrainJob("report", "r.yaml")
    wf = Workflow("pipeline")
    wf.add_job(prep)
    wf.add_job(train, dependencies=[prep])
    wf.add_job(report, dependencies=[prep, train])
    wf.run()                      # raises ValueError naming the jobs that failed
    print(wf.get_workflow_status())

Jobs launched from YAML files (LaunchJob, and FedML's TrainJob name for it) are all submitted at once, each with
`--after` its dependencies: the scheduler starts each when its dependencies have finished (and fails it, saying
why, when one did not), so the order holds even if this script dies. Jobs of your own (subclasses of Job) run
here, in dependency order.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from enum import Enum
from graphlib import CycleError, TopologicalSorter
from typing import Any

__all__ = ["Job", "JobStatus", "LaunchJob", "TrainJob", "Workflow"]


class JobStatus(Enum):
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    UNDETERMINED = "UNDETERMINED"


class Job(ABC):
    """One step of a workflow. `name` identifies it in the workflow (unique)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs: dict[str, Any] = {}

    @abstractmethod
    def run(self) -> None: ...

    @abstractmethod
    def status(self) -> JobStatus: ...

    @abstractmethod
    def kill(self) -> None: ...

    def set_inputs(self, inputs: dict[str, Any]) -> None:
        self.inputs = dict(inputs)

    def append_input(self, name: str, value: Any) -> None:
        self.inputs[name] = value

    def get_outputs(self) -> Any:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class LaunchJob(Job):
    """A job YAML launched on the scheduler (`fedml launch`). After run(), `run_id` names its run."""

    def __init__(self, name: str, job_yaml_absolute_path: str, api_key: str | None = None) -> None:
        super().__init__(name)
        self.job_yaml_absolute_path = job_yaml_absolute_path
        self.api_key = api_key
        self.run_id: str | None = None
        self._after: list[str] = []

    def run(self) -> None:
        from fedml_cli.errors import CliError
        from fedml_cli.submit import submit

        from ..api import _key

        try:
            with _key(self.api_key):
                _, run = submit(self.job_yaml_absolute_path, name=self.name, show_progress=False, after=self._after)
        except CliError as exc:
            raise ValueError(f"job {self.name}: {exc}") from None
        self.run_id = run["id"]

    def _run(self) -> dict[str, Any] | None:
        if self.run_id is None:
            return None
        from ..api import _connect, _key

        with _key(self.api_key):
            return _connect().get(f"/runs/{self.run_id}")  # type: ignore[no-any-return]

    def status(self) -> JobStatus:
        run = self._run()
        if run is None:
            return JobStatus.UNDETERMINED
        if run["status"] == "FINISHED":
            return JobStatus.FINISHED
        if run["status"] in ("FAILED", "KILLED"):
            return JobStatus.FAILED
        return JobStatus.RUNNING

    def kill(self) -> None:
        if self.run_id is not None:
            from ..api import run_stop

            run_stop(self.run_id, api_key=self.api_key)

    def get_outputs(self) -> Any:
        """The run's artifacts (what the job left in FEDML_ARTIFACT_DIR), as the scheduler lists them."""
        run = self._run()
        return {"run_id": self.run_id, "artifacts": (run or {}).get("artifacts", [])}


TrainJob = LaunchJob  # FedML's name for a job launched from a YAML file


class Workflow:
    """Jobs and their dependencies; run() runs them in dependency order and waits for all of them."""

    POLL_S = 0.5

    def __init__(self, name: str, loop: bool = False) -> None:
        if loop:
            raise NotImplementedError("looping workflows are not in fedml launch: call run() again")
        self.name = name
        self.jobs: dict[str, dict[str, Any]] = {}
        self.input: dict[str, Any] = {}
        self._order: list[Job] = []

    def add_job(self, job: Job, dependencies: list[Job] | None = None) -> None:
        if not isinstance(job, Job):
            raise TypeError("Only instances of the Job class (or its subclasses) can be added to the workflow.")
        deps = list(dependencies or [])
        if not all(isinstance(d, Job) for d in deps):
            raise TypeError("Dependencies must be instances of the Job class (or its subclasses).")
        if job.name in self.jobs:
            raise ValueError(f"Job {job.name} already exists in workflow.")
        self.jobs[job.name] = {"job": job, "dependencies": deps}

    def get_job_dependencies(self, job_name: str) -> list[Job]:
        return list(self.jobs[job_name]["dependencies"])

    def _topological(self) -> list[Job]:
        graph: dict[str, set[str]] = {}
        every: dict[str, Job] = {}
        for name, entry in self.jobs.items():
            every[name] = entry["job"]
            graph[name] = {d.name for d in entry["dependencies"]}
            for d in entry["dependencies"]:
                every.setdefault(d.name, d)
                graph.setdefault(d.name, set())
        try:
            return [every[n] for n in TopologicalSorter(graph).static_order()]
        except CycleError as exc:
            raise ValueError(f"workflow {self.name}: its jobs depend on each other in a cycle: {exc.args[1]}") from None

    def run(self) -> None:
        """Start every job in dependency order and wait until all have ended. ValueError naming the jobs that
        failed (the others are stopped, as FedML's workflow does)."""
        self._order = self._topological()
        started: set[str] = set()
        first = True
        for job in self._order:
            deps = self.jobs.get(job.name, {}).get("dependencies", [])
            if first:
                job.set_inputs(self.input)
                first = False
            if isinstance(job, LaunchJob) and all(isinstance(d, LaunchJob) for d in deps):
                job._after = [d.run_id for d in deps if d.run_id]  # the scheduler keeps the order
            else:
                self._wait([d for d in deps if d.name in started])  # a job of our own runs here, in order
            for d in deps:
                job.append_input(d.name, d.get_outputs())
            job.run()
            started.add(job.name)
        self._wait(self._order)

    def _wait(self, jobs: list[Job]) -> None:
        while True:
            states = {j.name: j.status() for j in jobs}
            if any(s in (JobStatus.FAILED, JobStatus.UNDETERMINED) for s in states.values()):
                # Read again to name every job that ended badly: one read at a time, a job read as running
                # could have failed before a later one (that the scheduler failed because of it) was read.
                states = {j.name: j.status() for j in jobs}
            failed = [n for n, s in states.items() if s in (JobStatus.FAILED, JobStatus.UNDETERMINED)]
            if failed:
                for j in jobs:
                    if states[j.name] == JobStatus.RUNNING:
                        j.kill()
                raise ValueError(f"Following jobs errored out, hence workflow cannot be completed: {failed}. "
                                 "Please check the logs for more information.")
            if all(s == JobStatus.FINISHED for s in states.values()):
                return
            time.sleep(self.POLL_S)

    def get_job_status(self, job_name: str) -> JobStatus:
        entry = self.jobs.get(job_name)
        return entry["job"].status() if entry else JobStatus.UNDETERMINED

    def get_workflow_status(self) -> JobStatus:
        states = [j.status() for j in (self._order or [e["job"] for e in self.jobs.values()])]
        if all(s == JobStatus.FINISHED for s in states):
            return JobStatus.FINISHED
        if any(s == JobStatus.FAILED for s in states) and JobStatus.RUNNING not in states:
            return JobStatus.FAILED
        return JobStatus.RUNNING

    def set_workflow_input(self, input: dict[str, Any]) -> None:  # noqa: A002 (FedML's name)
        self.input = input

    def get_workflow_output(self) -> Any:
        return self._order[-1].get_outputs() if self._order else None

    def get_all_jobs_outputs(self) -> dict[str, Any]:
        return {j.name: j.get_outputs() for j in self._order}
