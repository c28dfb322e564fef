"""Webhooks (`notify:` in a job, scheduler/webhooks.py): delivered once per event with a valid signature, retried
while the receiver fails, given up after the limit, recorded on the run, and never sent where a user may not
make the scheduler send (loopback, private, link-local addresses) unless an admin allows that network. Real local
schedulers and receivers on loopback; the address policy also as fast unit tests."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import ipaddress
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scheduler.contract.jobload import load_text
from scheduler.contract.jobspec import JobSpecError
from scheduler.webhooks import parse_allow, refused

from .conftest import Fedml, write_job
from .procs import wait_for

FAST = {"FEDML_WEBHOOK_ALLOW": "127.0.0.0/8", "FEDML_WEBHOOK_BACKOFF": "0.05"}


@pytest.mark.unit
def test_only_public_addresses_unless_an_admin_allows_the_network() -> None:
    for url in ("http://127.0.0.1:9/x", "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/",
                "http://192.168.1.1/", "http://[::1]:9/", "http://0.0.0.0:9/", "http://224.0.0.1/"):
        why = refused(url, [])
        assert why is not None and "not a public address" in why, (url, why)
    assert refused("http://127.0.0.1:9/x", parse_allow("127.0.0.0/8")) is None
    assert refused("http://10.1.2.3/", parse_allow("10.1.0.0/16, 127.0.0.0/8")) is None
    assert refused("http://10.2.0.1/", parse_allow("10.1.0.0/16")) is not None
    assert refused("http://8.8.8.8/", []) is None  # (a literal: nothing is resolved or sent)
    assert parse_allow("") == [] and parse_allow("::1/128") == [ipaddress.ip_network("::1/128")]
    with pytest.raises(ValueError):
        parse_allow("10.0.0.0/33")


@pytest.mark.unit
def test_a_notify_target_is_checked_where_it_is_written() -> None:
    ok = load_text("job: echo\nnotify:\n  - url: https://hooks.example/x?token=t\n    on: [finished]\n", file="j.yaml")
    assert ok.notify is not None and ok.notify[0].on == ["finished"]
    for bad, what in (("  - url: ftp://x/\n", "not an http(s) URL"), ("  - url: http://u:p@x/\n", "no user or password"),
                      ("  - url: http://x/\n    on: [done]\n", "j.yaml:4"), ("  - {}\n", "url")):
        with pytest.raises(JobSpecError, match=re.escape(what)):
            load_text("job: echo\nnotify:\n" + bad, file="j.yaml")


class Receiver:
    """An HTTP server on loopback that answers each POST with the next code of `codes` (then 200) and keeps
    what it got."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.codes = list(codes or [])
        me = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                me.got.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = me.codes.pop(0) if me.codes else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=secret-in-query"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def launch(fedml: Fedml, tmp_path: Path, name: str, url: str, on: str, job: str = "echo hi", **env: str) -> str:
    path = write_job(tmp_path / name, job, extra=f"notify:\n  - url: {url}\n    on: [{on}]\n")
    r = fedml("launch", str(path), env={**FAST, **env})
    assert r.returncode in (0, 1), r.stderr
    return r.stderr.split("Run ")[1].split()[0]


def deliveries(fedml: Fedml, run_id: str, n: int) -> list[dict[str, Any]]:
    def got() -> list[dict[str, Any]] | None:
        d = json.loads(fedml("run", "status", run_id, "--json").stdout)["deliveries"]
        return d if len(d) >= n else None

    return wait_for(f"{n} webhook deliveries recorded on {run_id}", got, timeout=60)


def test_each_event_is_delivered_once_signed_and_recorded(fedml: Fedml, tmp_path: Path, receiver: Receiver) -> None:
    run_id = launch(fedml, tmp_path, "ok", receiver.url, "started, finished")
    done = deliveries(fedml, run_id, 2)
    assert sorted(d["event"] for d in done) == ["finished", "started"]
    assert all(d["state"] == "delivered" and d["tries"] == 1 and d["code"] == 200 for d in done), done
    assert all("secret-in-query" not in d["url"] for d in done)  # (the query is not kept)
    assert len(receiver.got) == 2  # once per event
    secret = fedml("notify", "secret").stdout.strip()
    for headers, body in receiver.got:
        want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-fedml-signature"], want)
        doc = json.loads(body)
        assert doc["run_id"] == run_id and doc["event"] == headers["x-fedml-event"] and run_id in doc["text"]
    status = " ".join(fedml("run", "status", run_id).stdout.split())
    assert "webhook" in status and "delivered after 1 try" in status, status


def test_a_failing_receiver_is_retried_and_given_up_after_the_limit(fedml: Fedml, tmp_path: Path) -> None:
    flaky, dead = Receiver([500, 503]), Receiver([500] * 10)
    try:
        first = launch(fedml, tmp_path, "flaky", flaky.url, "finished")
        second = launch(fedml, tmp_path, "dead", dead.url, "finished")
        d = deliveries(fedml, first, 1)[0]
        assert (d["state"], d["tries"], d["code"]) == ("delivered", 3, 200) and len(flaky.got) == 3, d
        d = deliveries(fedml, second, 1)[0]
        assert (d["state"], d["tries"], d["error"]) == ("failed", 5, "HTTP 500") and len(dead.got) == 5, d
    finally:
        flaky.close()
        dead.close()


def test_a_loopback_receiver_is_refused_unless_allowed(fedml: Fedml, tmp_path: Path, receiver: Receiver) -> None:
    run_id = launch(fedml, tmp_path, "no", receiver.url, "finished", FEDML_WEBHOOK_ALLOW="")
    d = deliveries(fedml, run_id, 1)[0]
    assert d["state"] == "failed" and "not a public address" in d["error"] and d["tries"] == 1, d
    assert receiver.got == []


def test_a_teams_webhooks_are_the_default_of_its_runs(fedml: Fedml, tmp_path: Path, receiver: Receiver) -> None:
    """`fedml team notify TEAM --url ...`: a run of the team whose job names no webhook is delivered there,
    signed with the team's secret; a job's own `notify:` replaces the team's."""
    assert fedml("team", "create", "ml", env=FAST).returncode == 0
    r = fedml("team", "notify", "ml", "--url", receiver.url, "--on", "finished")
    assert r.returncode == 0, r.stderr
    # (an admin key of the team: the local node runs only its admin's jobs)
    member = fedml("scheduler", "key", "create", "ann", "--admin", "--team", "ml").stdout.strip()
    as_ann = {**FAST, "FEDML_SERVER": json.loads((fedml.home / "local" / "scheduler.json").read_text())["url"],
              "FEDML_API_KEY": member}
    plain = write_job(tmp_path / "plain", "echo hi")
    r = fedml("launch", str(plain), env=as_ann)
    assert r.returncode == 0, r.stderr
    run_id = r.stderr.split("Run ")[1].split()[0]
    done = deliveries(fedml, run_id, 1)
    assert done[0]["event"] == "finished" and done[0]["state"] == "delivered", done
    (headers, body), = receiver.got
    secret = fedml("notify", "secret", "--owner", "team:ml").stdout.strip()
    assert hmac.compare_digest(headers["x-fedml-signature"],
                               "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest())
    doc = json.loads(body)
    assert doc["run_id"] == run_id
    status = json.loads(fedml("run", "status", run_id, "--json").stdout)
    assert status["team"] == "ml"
    shown = fedml("team", "show", "ml").stdout
    assert "ann" in shown and receiver.url in shown, shown  # (its keys; the query of the URL is the admin's)
    bad = fedml("team", "notify", "ml")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: give --url (one or more) or --clear", bad
    assert fedml("team", "notify", "ml", "--clear").returncode == 0
    assert json.loads(fedml("team", "show", "ml", "--json").stdout)["notify"] == []
