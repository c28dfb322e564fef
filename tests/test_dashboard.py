"""The web dashboard (issue 16). In process (FastAPI's TestClient): sessions, CSRF, what a page may read.
In a real browser (headless Chromium from Debian's packages, driven by Playwright): sign in, a launched run
appears by itself, its log lines arrive live, a `<script>` line is text, stop it, the queue's reason, drain a
node, create and revoke a key, another user does not see the run. Screenshots land in the test's directory
(and in FEDML_SCREENSHOTS when set)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler import auth
from scheduler.app import Settings, create_app
from scheduler.sqlite_store import SQLiteStore

from .conftest import Fedml, needs, write_job

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], SQLiteStore]]:
    store = SQLiteStore(tmp_path / "s.db")
    keys = {name: auth.issue(store, name=name, scope=scope, owner=name if scope == "user" else "admin")[1]
            for name, scope in (("admin", "admin"), ("alice", "user"), ("bob", "user"))}
    keys["node"] = auth.issue(store, name="n", scope="node", owner="node-1")[1]
    with TestClient(create_app(store, Settings(blob_dir=tmp_path / "blobs"))) as c:
        yield c, keys, store
    store.close()


def sign_in(c: TestClient, key: str) -> dict[str, Any]:
    r = c.post("/ui/session", json={"api_key": key})
    assert r.status_code == 200, r.text
    return r.json()


def test_pages_and_assets_are_served_with_a_strict_policy(client: Any) -> None:
    c, _, _ = client
    r = c.get("/")
    assert r.status_code == 200 and "<main" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"] and "unsafe" not in r.headers["content-security-policy"]
    assert c.get("/ui/app.js").status_code == 200 and c.get("/ui/app.css").status_code == 200
    assert c.get("/ui/../app.py").status_code == 404 and c.get("/ui/secret").status_code == 404


def test_no_data_without_a_session_and_no_action_without_its_csrf_token(client: Any) -> None:
    """A session is a key of its own in an HttpOnly, SameSite=Strict cookie; every action needs its CSRF token;
    signing out revokes it; node keys and bad keys sign nothing in."""
    c, keys, _ = client
    for path in ("/api/v1/runs", "/api/v1/events", "/api/v1/nodes"):
        assert c.get(path).status_code == 401, path
    assert c.get("/ui/session").status_code == 401
    for bad in (keys["node"], "fml_u_nope", "x" * 150):
        assert c.post("/ui/session", json={"api_key": bad}).status_code == 401
    assert c.post("/ui/session", content=b"{" + b" " * 5000 + b"}",
                  headers={"content-type": "application/json"}).status_code == 413  # capped before it is read
    r = c.post("/ui/session", json={"api_key": keys["alice"]})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
    assert keys["alice"] not in cookie  # a session key of its own, not the user's key
    csrf = r.json()["csrf"]
    assert r.json()["owner"] == "alice" and r.json()["admin"] is False
    assert c.get("/ui/session").json()["csrf"] == csrf
    job = {"job": {"job": "echo hi"}}
    assert c.post("/api/v1/runs", json=job).status_code == 403  # no token
    assert c.post("/api/v1/runs", json=job, headers={"x-csrf-token": "0" * 40}).status_code == 403
    r = c.post("/api/v1/runs", json=job, headers={"x-csrf-token": csrf})
    assert r.status_code == 201 and r.json()["owner"] == "alice"
    theirs = c.post("/api/v1/runs", json=job, headers={"Authorization": f"Bearer {keys['bob']}"}).json()
    assert [x["id"] for x in c.get("/api/v1/runs").json()] == [r.json()["id"]]  # only hers
    assert c.get(f"/api/v1/runs/{theirs['id']}").status_code == 404
    assert c.get("/api/v1/keys").status_code == 403  # a user's session is no admin
    assert c.delete("/ui/session").status_code == 403  # signing out is an action too
    session = c.cookies.get("fedml_session")
    assert c.delete("/ui/session", headers={"x-csrf-token": csrf}).status_code == 200
    c.cookies.set("fedml_session", session)  # the old cookie, kept by a client that ignores the deletion
    assert c.get("/api/v1/runs").status_code == 401 and c.get("/ui/session").status_code == 401


def test_a_session_expires_and_a_sign_in_link_works_once(client: Any) -> None:
    c, keys, store = client
    code = c.post("/api/v1/ui/link", headers={"Authorization": f"Bearer {keys['bob']}"}).json()["code"]
    assert c.post("/api/v1/ui/link", headers={"Authorization": f"Bearer {keys['node']}"}).status_code == 403
    assert sign_in(c, code)["owner"] == "bob"
    c.cookies.clear()
    assert c.post("/ui/session", json={"api_key": code}).status_code == 401  # spent
    _, short = auth.issue(store, name="short", scope="user", owner="carol", ttl=0.01)
    time.sleep(0.05)
    assert c.post("/ui/session", json={"api_key": short}).status_code == 401  # expired
    assert c.get("/api/v1/runs", headers={"Authorization": f"Bearer {short}"}).status_code == 401


def test_runs_are_filtered_and_paged_by_the_scheduler_and_counted_per_state(client: Any) -> None:
    c, keys, _ = client
    alice, bob = ({"authorization": f"Bearer {keys[k]}"} for k in ("alice", "bob"))
    mine = [c.post("/api/v1/runs", json={"job": {"job": "echo", "job_name": f"train-{i}"}}, headers=alice).json()["id"]
            for i in range(5)]
    c.post("/api/v1/runs", json={"job": {"job": "echo", "job_name": "train-bob"}}, headers=bob)
    first = c.get("/api/v1/runs", params={"limit": 2}, headers=alice)
    assert [r["id"] for r in first.json()] == mine[:-3:-1]
    rest = c.get("/api/v1/runs", params={"limit": 10, "before": first.headers["x-next-before"]}, headers=alice)
    assert [r["id"] for r in rest.json()] == mine[-3::-1] and "x-next-before" not in rest.headers
    found = c.get("/api/v1/runs", params={"q": "TRAIN-3"}, headers=alice).json()  # (bob's train-bob is not alice's)
    assert [r["id"] for r in found] == [mine[3]]
    assert c.get("/api/v1/runs", params={"before": "1;drop"}, headers=alice).status_code == 422
    assert c.get("/api/v1/runs", params={"node": "nope"}, headers=alice).status_code == 422
    assert json.loads(c.get("/api/v1/runs", params={"counts": "true"}, headers=alice).headers["x-run-counts"]) == {
        "QUEUED": 5}
    admin = {"authorization": f"Bearer {keys['admin']}"}
    assert json.loads(c.get("/api/v1/runs", params={"counts": "true", "limit": 1}, headers=admin).headers[
        "x-run-counts"]) == {"QUEUED": 6}
    assert c.get("/api/v1/runs", params={"mine": "true"}, headers=admin).json() == []


def test_retry_and_the_environment_shown_without_secrets(client: Any) -> None:
    c, keys, _ = client
    alice, bob = ({"authorization": f"Bearer {keys[k]}"} for k in ("alice", "bob"))
    run = c.post("/api/v1/runs", json={"job": {"job": "echo", "envs": {"HF_TOKEN": "hf_secret", "LR": "0.1"}},
                                       "env": {"DB_PASSWORD": "pw"}}, headers=alice).json()
    env = c.get(f"/api/v1/runs/{run['id']}/env", headers=alice).json()["env"]
    assert env["LR"] == "0.1" and env["FEDML_CURRENT_RUN_ID"] == run["id"]
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # (CUDA's numbering is NVML's, which the GPUs given use)
    assert env["HF_TOKEN"] == "(hidden)" and env["DB_PASSWORD"] == "(hidden)"
    assert c.get(f"/api/v1/runs/{run['id']}/env", headers=bob).status_code == 404  # not bob's
    assert c.post(f"/api/v1/runs/{run['id']}/retry", headers=alice).status_code == 409  # it has not ended
    c.post(f"/api/v1/runs/{run['id']}/stop", headers=alice)
    assert c.post(f"/api/v1/runs/{run['id']}/retry", headers=bob).status_code == 404
    again = c.post(f"/api/v1/runs/{run['id']}/retry", headers=alice)
    assert again.status_code == 201, again.text
    new = again.json()
    assert new["id"] != run["id"] and new["status"] == "QUEUED" and new["owner"] == "alice"
    assert new["job"] == run["job"] and new["env"] == {"DB_PASSWORD": "pw"}


# ---- in a real browser -------------------------------------------------------------------------------------

@pytest.fixture
def browser() -> Iterator[Any]:
    needs("Chromium", os.path.exists(CHROMIUM), f"{CHROMIUM} is missing (make install puts Debian's chromium there)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        needs("Playwright", False, "the playwright package is missing (make install)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield b
        finally:
            b.close()


def shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("FEDML_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["FEDML_SCREENSHOTS"]) / path.name)


def test_the_dashboard_in_a_browser(fedml: Fedml, browser: Any, tmp_path: Path) -> None:
    # the local scheduler and its agent, with one (declared) GPU for the queue to wait for
    assert fedml("run", "list", env={"FEDML_LOCAL_GPUS": "A100-80G:1"}).returncode == 0
    url = json.loads((fedml.home / "local" / "scheduler.json").read_text())["url"]
    admin = (fedml.home / "local" / "token").read_text().strip()  # (the local scheduler's admin key)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.fill("#api-key", "fml_u_wrong")
    page.click("#signin")
    page.wait_for_selector("text=not a valid admin or user API key")
    link = json.loads(fedml("dashboard", "--json", "--no-open").stdout)["sign_in"]  # `fedml dashboard`'s link
    page.goto(link)
    page.wait_for_selector("#nav >> text=Keys")
    assert "signin" not in page.url  # the code is gone from the address bar
    again = browser.new_context().new_page()
    again.goto(link)
    again.wait_for_selector("text=That sign-in link was used or has expired")  # once only
    again.fill("#api-key", admin)
    again.click("#signin")
    again.wait_for_selector("#nav >> text=Keys")
    again.context.close()

    # a run launched from the CLI appears by itself (pushed), and its lines arrive live
    job = write_job(tmp_path / "talk", 'for i in $(seq 1 40); do echo "line $i"; sleep 0.05; done\n'
                    'for i in 1 2 3 4 5; do echo "FEDML_METRIC {\\"loss\\": $((10 - i)), \\"step\\": $i}"; done\n'
                    "echo '<script>window.pwned = 1</script><b>bold</b>'\nsleep 60")
    r = fedml("launch", str(job), "--detach")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    page.wait_for_selector(f"#runs >> text={run_id}", timeout=15_000)
    shot(page, tmp_path, "runs")
    page.click(f"#runs >> text={run_id}")
    page.wait_for_selector("#log .row >> text=line 40", timeout=30_000)
    page.wait_for_selector("#log .row >> text=<script>window.pwned = 1</script><b>bold</b>", timeout=15_000)
    assert page.evaluate("window.pwned") is None and page.locator("#log b").count() == 0  # shown as text
    page.wait_for_selector('#metrics figure[data-metric="loss"] polyline', timeout=15_000)  # the job's metrics, plotted
    assert "loss 5" in page.inner_text('#metrics figure[data-metric="loss"] figcaption')
    assert "null" not in page.inner_text("#metrics")
    page.select_option("#rank", "0")
    page.wait_for_selector("#log .row >> text=line 3")
    page.select_option("#attempt", "1")  # (the scheduler filters: rank 0's lines of attempt 1)
    page.wait_for_selector("#log-note >> text=rank 0, attempt 1:")
    page.wait_for_selector("#log .row >> text=line 3")
    shot(page, tmp_path, "run")
    page.click("#stop")
    page.wait_for_selector("dd >> text=KILLED", timeout=30_000)
    page.wait_for_selector("#timeline >> text=KILLED")
    assert "for i in $(seq 1 40)" in (page.text_content("#spec pre") or "")  # the job file as submitted
    page.click("#env summary")
    page.wait_for_selector(f"#env-table >> text={run_id}")  # FEDML_CURRENT_RUN_ID, among the variables
    page.click("#retry")  # a new run of the same job
    page.wait_for_url(lambda u: run_id not in u)
    again = page.url.rsplit("/", 1)[-1]
    page.wait_for_selector(f"h1 >> text={again}")
    page.wait_for_selector("#log .row >> text=line 2", timeout=30_000)
    assert again.startswith("run-") and again != run_id
    page.click("#stop")
    page.wait_for_selector("dd >> text=KILLED", timeout=30_000)

    from playwright.sync_api import expect

    # the runs page filters on the scheduler: the search box finds the run by its id
    page.goto(url + "/#/runs")
    page.fill("#run-filter", again)
    page.wait_for_selector(f"#runs >> text={again}")
    expect(page.locator("#runs tbody tr")).to_have_count(1)  # (the page's policy lets no test script eval)
    page.click('button[data-status="KILLED"]')
    page.wait_for_selector(f"#runs >> text={again}")

    # the queue: the GPU is busy with a run of 10 minutes at most: the next GPU run waits first in line, and
    # says why, behind whom and from when; a run waiting for another is not in line yet
    gpu = "computing:\n  minimum_num_gpus: 1\n"
    busy = fedml("launch", str(write_job(tmp_path / "busy", "sleep 60", extra=gpu + "max_duration: 10m\n")), "--detach")
    assert busy.returncode == 0, busy.stderr
    first = busy.stdout.strip()
    nxt = fedml("launch", str(write_job(tmp_path / "next", "echo next", extra=gpu)), "--detach")
    assert nxt.returncode == 0, nxt.stderr
    queued = nxt.stdout.strip()
    waiting = fedml("launch", str(write_job(tmp_path / "after", "echo after")), "--after", first, "--detach")
    assert waiting.returncode == 0, waiting.stderr
    assert fedml("team", "create", "ml").returncode == 0  # a team's quota bar on the queue page
    assert fedml("team", "quota", "ml", "--gpus", "any:4").returncode == 0
    page.goto(url + "/#/queue")
    page.wait_for_selector('#quotas tr[data-team="ml"] >> text=0 of 4 GPUs', timeout=15_000)
    row = f'#queue tr[data-run="{queued}"]'
    page.wait_for_selector(f"{row} >> text=no node with 1 free GPU", timeout=15_000)
    assert page.inner_text(f"{row} .position") == "1"
    assert re.fullmatch(r"about (9|10)m from now", page.inner_text(f"{row} .starts")), page.inner_text(f"{row} .starts")
    page.wait_for_selector(f"#held >> text=waiting for {first} to end", timeout=15_000)
    shot(page, tmp_path, "queue")
    said = json.loads(fedml("queue", "--json").stdout)  # the same answer in the CLI
    assert [r["id"] for r in said["runs"]] == [queued] and said["held"][0]["reason"] == f"waiting for {first} to end"
    plain = fedml("queue")
    assert plain.returncode == 0 and queued in plain.stdout and "no node with 1 free GPU" in plain.stdout, plain.stdout
    status = fedml("run", "status", queued).stdout  # its standing in `fedml run status` too
    assert re.search(r"in line\s+1 of 1", status) and re.search(r"starts\s+in about (9|10)m", status), status
    for done in (first, queued):
        assert fedml("run", "stop", done).returncode == 0

    # an endpoint: its replicas, what the gateway answered, and scaling from the page
    from tests.test_serve import serve_job

    served = fedml("launch", str(serve_job(tmp_path / "serve", service="name: echo\nreplicas: 1")), "--detach",
                   env={"PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")})
    assert served.returncode == 0, served.stderr
    page.goto(url + "/#/endpoints")
    page.wait_for_selector('section[data-endpoint="echo"] >> text=1 of 1', timeout=60_000)
    page.fill('section[data-endpoint="echo"] input.replicas', "2")
    page.click('section[data-endpoint="echo"] >> text=Scale')
    page.wait_for_selector('section[data-endpoint="echo"] >> text=2 of 2', timeout=60_000)
    for i in range(5):
        assert fedml("endpoint", "call", "echo", json.dumps({"i": i})).returncode == 0
    page.reload()
    page.wait_for_selector('section[data-endpoint="echo"] .traffic >> text=0 errors of 5')
    shot(page, tmp_path, "endpoints")
    fedml("run", "stop", served.stdout.strip())

    # on a phone, in dark mode, by keyboard: nothing wider than the screen, dark colours, the nav reached by Tab
    phone = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark").new_page()
    phone.goto(url + "/")
    phone.fill("#api-key", admin)
    phone.press("#api-key", "Enter")
    phone.wait_for_selector("#runs tbody tr")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert phone.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(17, 20, 24)"
    shot(phone, tmp_path, "phone-dark")
    seen = []
    for _ in range(10):  # (back from the page's content, where a page puts the focus, to the nav above it)
        phone.keyboard.press("Shift+Tab")
        seen.append(phone.evaluate("document.activeElement.textContent"))
        if seen[-1] == "Queue":
            break
    assert seen[-1] == "Queue", seen
    phone.keyboard.press("Enter")
    phone.wait_for_selector("h1 >> text=Queue")
    phone.context.close()

    # nodes: drain and undrain from the page
    page.goto(url + "/#/nodes")
    page.click("#nodes button.drain")
    page.wait_for_selector("#nodes >> text=DRAINING", timeout=15_000)
    shot(page, tmp_path, "nodes")
    page.click("#nodes button.drain")
    page.wait_for_selector("#nodes button.drain >> text=Drain", timeout=15_000)

    # keys: create one (shown once), then sign in with it in another browser: it sees none of the admin's runs
    page.goto(url + "/#/keys")
    page.fill("#key-name", "bob")
    page.click("#create-key")
    page.wait_for_selector("#new-key >> text=shown once")
    secret = page.inner_text("#new-key").rsplit(" ", 1)[-1]
    assert secret.startswith("fml_u_")
    page.evaluate("document.getElementById('new-key').textContent = "
                  "document.getElementById('new-key').textContent.replace(/fml_u_\\S+/, 'fml_u_(hidden here)')")
    shot(page, tmp_path, "keys")  # (not the secret: the picture goes into the docs)
    other = browser.new_context().new_page()
    other.goto(url + "/")
    other.fill("#api-key", secret)
    other.click("#signin")
    other.wait_for_selector("text=No runs here yet.")
    assert other.locator(f"text={run_id}").count() == 0
    other.goto(url + f"/#/run/{run_id}")
    other.wait_for_selector("text=not found")
    page.fill("#key-name", "prometheus")  # a key for Prometheus: listed, and revoked from here too
    page.select_option("#key-scope", "metrics")
    page.click("#create-key")
    page.wait_for_selector("#new-key >> text=fml_m_")
    page.wait_for_selector('#keys tr:has(button.revoke[data-key="prometheus"]) >> text=metrics')
    page.click('#keys button.revoke[data-key="bob"]')
    page.wait_for_selector('#keys button.revoke[data-key="bob"]', state="detached")  # bob's row: revoked
    other.goto(url + "/#/nodes")
    other.wait_for_selector("text=Your session has ended", timeout=15_000)  # bob's key was revoked: so is his session

    # remove the node (after a confirmation): it leaves the page, and the API
    page.goto(url + "/#/nodes")
    page.once("dialog", lambda d: d.accept())
    page.click("#nodes button.remove")
    page.wait_for_selector("#nodes button.remove", state="detached", timeout=15_000)
    assert json.loads(fedml("node", "list", "--json").stdout) == []
    assert not errors, errors


def test_a_rank_filter_shows_that_ranks_lines_one_after_another(browser: Any, tmp_path: Path) -> None:
    """Two ranks on two real agents print interleaved lines; filtered to rank 1 the log shows rank 1's lines
    each in the row after the one before (the scheduler filters: no row left empty for rank 0's lines)."""
    from .cluster import start_cluster

    gen = start_cluster(tmp_path, ("a", "b"), torch=False)
    c = next(gen)
    try:
        job = write_job(tmp_path / "two", 'for i in $(seq 1 30); do echo "r$FEDML_CLIENT_RANK line $i"; sleep 0.02; done',
                        extra="num_nodes: 2\n")
        r = c.fedml("launch", str(job))
        assert r.returncode == 0, r.stderr
        run_id = next(x for x in r.stdout.split() + r.stderr.split() if x.startswith("run-"))
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(c.url + "/")
        page.fill("#api-key", c.admin)
        page.click("#signin")
        page.wait_for_selector("#nav >> text=Keys")
        page.goto(c.url + f"/#/run/{run_id}")
        page.wait_for_selector("#log .row >> text=r0 line 30", timeout=30_000)
        page.select_option("#rank", "1")
        page.wait_for_selector("#log-note >> text=rank 1: 30 lines")
        rows = page.locator("#log .row").all()
        texts = [row.evaluate("e => e.lastChild.textContent") for row in rows]  # (after the rank:attempt)
        tops = [row.evaluate("e => e.offsetTop") for row in rows]
        assert [t for t in texts if t] == [f"r1 line {i}" for i in range(1, 31)], texts
        assert tops == [18 * i for i in range(30)], tops
    finally:
        next(gen, None)



# ---- in Firefox ----------------------------------------------------------------------------------------------

FIREFOX = shutil.which("firefox-esr") or "/usr/bin/firefox-esr"


@pytest.fixture
def firefox(tmp_path: Path) -> Iterator[Any]:
    """Debian's Firefox ESR, headless, driven over Marionette by Mozilla's own client (marionette-driver): what
    Selenium's geckodriver speaks to, without a binary from outside the package registries. A profile of its own
    (its Marionette port, no first-run pages or updates)."""
    needs("Firefox", os.path.exists(FIREFOX), f"{FIREFOX} is missing (make install puts Debian's firefox-esr there)")
    try:
        from marionette_driver.marionette import Marionette
    except ImportError:
        needs("marionette-driver", False, "the marionette-driver package is missing (make install)")
    from .procs import free_port

    port = free_port()
    profile = tmp_path / "firefox-profile"
    profile.mkdir()
    (profile / "user.js").write_text("".join(f'user_pref("{k}", {json.dumps(v)});\n' for k, v in {
        "marionette.port": port, "browser.shell.checkDefaultBrowser": False, "app.update.disabledForTesting": True,
        "browser.startup.homepage_override.mstone": "ignore", "datareporting.policy.dataSubmissionEnabled": False,
        "toolkit.telemetry.reportingpolicy.firstRun": False, "network.proxy.type": 0,
        "browser.aboutwelcome.enabled": False}.items()))
    proc = subprocess.Popen([FIREFOX, "--headless", "--marionette", "--no-remote", "--profile", str(profile),
                             "--window-size", "1280,900"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"})
    m = Marionette(host="127.0.0.1", port=port, startup_timeout=60)
    try:
        m.start_session()
        yield m
    finally:
        try:
            m.delete_session()
        except Exception:  # noqa: BLE001 - the browser may be gone already; it is killed below either way
            pass
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_dashboard_in_firefox(fedml: Fedml, firefox: Any, tmp_path: Path) -> None:
    """Sign in, see a launched run appear (pushed), follow its live lines, stop it, and the queue, in Firefox."""
    import base64

    from marionette_driver import By, Wait

    m = firefox

    def until(what: str, check: Any, timeout: float = 30) -> Any:
        return Wait(m, timeout=timeout, interval=0.1).until(lambda _: check(), message=what)

    def text(css: str) -> str:  # (in one go: the page replaces its rows as they change)
        return str(m.execute_script("return Array.from(document.querySelectorAll(arguments[0]))"
                                    ".map(e => e.textContent).join(' ')", script_args=[css]))

    assert fedml("run", "list").returncode == 0
    url = json.loads((fedml.home / "local" / "scheduler.json").read_text())["url"]
    admin = (fedml.home / "local" / "token").read_text().strip()
    m.navigate(url + "/")
    until("the sign-in form", lambda: m.find_elements(By.ID, "api-key"))
    m.find_element(By.ID, "api-key").send_keys(admin)
    m.find_element(By.ID, "signin").click()
    until("signed in", lambda: "Keys" in text("#nav"))

    job = write_job(tmp_path / "talk", 'for i in $(seq 1 30); do echo "line $i"; sleep 0.05; done\n'
                    "echo '<script>window.pwned = 1</script>'\nsleep 60")
    r = fedml("launch", str(job), "--detach")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.strip()
    until("the run in the table, pushed", lambda: run_id in text("#runs"))
    m.find_element(By.LINK_TEXT, run_id).click()
    until("its lines, live", lambda: "line 30" in text("#log .row"))
    until("the script line, as text", lambda: "<script>" in text("#log .row"))
    assert m.execute_script("return window.wrappedJSObject.pwned === undefined "
                            "&& document.querySelectorAll('#log script').length === 0") is True  # text, not HTML
    (tmp_path / "firefox-run.png").write_bytes(base64.b64decode(m.screenshot()))
    m.find_element(By.ID, "stop").click()
    until("KILLED", lambda: "KILLED" in text("dd"))
    m.navigate(url + "/#/queue")
    until("the queue page", lambda: "Nothing waits" in text("main"))
