"""Following a run's log to its end (launch and `fedml logs -f`), reconnecting when the scheduler restarts, and
what Ctrl-C means meanwhile."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from .errors import INTERRUPTED, NOT_FOUND, USAGE, CliError
from .output import err as _err
from .show import _run_exit_code, write_text


def _interrupted(api: Any, run_id: str, stop_on_interrupt: bool) -> int:
    if stop_on_interrupt:
        try:
            api.post(f"/runs/{run_id}/stop")
            _err(f"\nInterrupted: stop requested for run {run_id}.")
        except CliError as exc:
            _err(f"\nInterrupted; could not stop run {run_id}: {exc}")
    else:
        _err(f"\nStopped following. Run {run_id} keeps running: `fedml logs -f {run_id}` to follow it again, "
             f"`fedml run stop {run_id}` to stop it.")
    return INTERRUPTED


class _QueueWatch:
    """While a launched run waits to be placed, say why: a spinner with the reason on a terminal, a line per new
    reason otherwise (stderr), once it has waited a second. It runs beside the log follower, which starts at once,
    so a run placed at once costs nothing; it ends when the run leaves the queue or the first log line arrives."""

    def __init__(self, api: Any, run: dict[str, Any]) -> None:
        import threading

        from .api import Api

        self.api = Api(api.url, api.token)  # its own connection: the follower streams on the other
        self.run_id, self.reason = run["id"], None
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.spinner: Any = None
        self.thread = threading.Thread(target=self._watch, args=(run,), name="queue-watch", daemon=True)
        self.thread.start()

    def _watch(self, run: dict[str, Any]) -> None:
        try:
            # Quiet for a second: most runs are placed by then, and a scheduler that has just started would
            # otherwise say "no nodes have joined yet" while its own local agent is still joining.
            if self.done.wait(1.0):
                return
            run = self.api.get(f"/runs/{self.run_id}")
            while run.get("status") == "QUEUED" and not self.done.is_set():
                if run.get("reason") and run["reason"] != self.reason:
                    self._say(f"queued: {run['reason']}")
                    self.reason = run["reason"]
                if self.done.wait(0.5):
                    break
                run = self.api.get(f"/runs/{self.run_id}")
        except CliError:
            pass  # the follower reports a lost scheduler
        finally:
            self.stop()

    def _say(self, text: str) -> None:
        with self.lock:
            if self.done.is_set():
                return
            if not sys.stderr.isatty():
                _err(text)
                return
            from rich.markup import escape

            if self.spinner is None:
                from rich.console import Console

                self.spinner = Console(stderr=True).status(escape(text), spinner="dots")
                self.spinner.start()
            else:
                self.spinner.update(escape(text))

    def stop(self) -> None:
        with self.lock:
            self.done.set()
            if self.spinner is not None:
                self.spinner.stop()
                self.spinner = None


def _follow(api: Any, run_id: str, *, as_json: bool = False, stop_on_interrupt: bool = False,
            after: int = -1, tail: int | None = None, rank: int | None = None, ranked: bool = False,
            on_first: Any = None) -> int:
    """Print the run's log until it ends; reconnect if the scheduler restarts. Returns the exit code."""
    out, err = sys.stdout, sys.stderr
    end: dict[str, Any] | None = None
    delay = 0.2
    try:
        while end is None:
            try:
                if as_json:
                    for chunk in api.stream_log_chunks(run_id, after=after, tail=tail, follow=True, rank=rank):
                        lines = []
                        for rec in chunk:
                            if rec.get("end"):
                                end = rec
                                break
                            after = rec["pos"]
                            lines.append(json.dumps(rec) + "\n")
                        if lines and on_first is not None:  # the run left the queue (stop the spinner first)
                            on_first()
                            on_first = None
                        out.write("".join(lines))
                        out.flush()  # a pipe is block-buffered: a CI step reading it must see lines as they come
                        delay = 0.2
                        if end is not None:
                            break
                else:  # the text form, a chunk of records at a time
                    for got in api.stream_log_text(run_id, after=after, tail=tail, follow=True, rank=rank):
                        if isinstance(got, dict):
                            end = got
                            break
                        if not got:
                            continue
                        if on_first is not None:
                            on_first()
                            on_first = None
                        last = write_text(got, ranked, out, err)
                        if last is not None:  # (0 is a position: the first line)
                            after = last
                        out.flush()  # a pipe is block-buffered: `fedml logs -f | grep` must see lines as they come
                        delay = 0.2
                tail = None
            except CliError as exc:
                if exc.code in (NOT_FOUND, USAGE):
                    raise
                out.flush()
                _err(f"(connection to the scheduler lost: {exc}; retrying)")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                if api.embedded:
                    from .api import connect

                    api = connect()
            out.flush()
    except KeyboardInterrupt:
        out.flush()
        return _interrupted(api, run_id, stop_on_interrupt)
    out.flush()
    run = {"status": end["status"], "exit_code": end.get("exit_code")}
    code = _run_exit_code(run)
    if as_json:
        out.write(json.dumps({"end": True, "run_id": run_id, **{k: end.get(k) for k in
                                                                ("status", "exit_code", "reason")}}) + "\n")
    elif end["status"] != "FINISHED":
        why = f": {end['reason']}" if end.get("reason") else ""
        _err(f"Run {run_id} {end['status']}{why}")
    return code
