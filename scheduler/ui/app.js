// The fedml launch dashboard: plain JavaScript, no build step, no CDN. Every view reads the same HTTP API the
// CLI uses (/api/v1, with the session cookie; actions send the session's CSRF token), and re-reads it when the
// push stream (/api/v1/events, server-sent events) says something changed. Text from the API is always put in
// the page as text (textContent), never as HTML.
"use strict";

const S = { session: null, events: null, page: null, timer: null, moved: new Set() };
const TERMINAL = new Set(["FINISHED", "FAILED", "KILLED"]);
const LINE_H = 18; // px, one log row (app.css .log .row)
const WINDOW = 500; // log lines read at a time

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v == null) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v; // (through the CSSOM: the CSP allows no inline style attribute)
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const k of kids.flat(Infinity)) if (k != null) e.append(k instanceof Node ? k : String(k));
  return e;
}

async function api(path, { method = "GET", body, params, withHeaders = false } = {}) {
  const url = new URL("/api/v1" + path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, x));
    else if (v != null && v !== "") url.searchParams.set(k, v);
  }
  const headers = {};
  if (method !== "GET") headers["x-csrf-token"] = S.session ? S.session.csrf : "";
  if (body !== undefined) headers["content-type"] = "application/json";
  const r = await fetch(url, { method, headers, credentials: "same-origin",
                               body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) { signedOut("Your session has ended: sign in again."); throw new Error("not signed in"); }
  const type = r.headers.get("content-type") || "";
  const data = type.includes("json") && !type.includes("ndjson") ? await r.json() : await r.text();
  if (!r.ok) {
    const d = data && data.detail;
    throw new Error(typeof d === "string" ? d : d ? JSON.stringify(d) : `HTTP ${r.status}`);
  }
  return withHeaders ? { data, headers: r.headers } : data;
}

function ago(ts) {
  if (!ts) return "-";
  const s = Date.now() / 1000 - ts;
  if (s < 60) return `${s.toFixed(0)}s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)}m ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)}h ago`;
  return new Date(ts * 1000).toLocaleString();
}

function duration(run) {
  if (!run.started_at) return "-";
  const s = (run.ended_at || Date.now() / 1000) - run.started_at;
  return s < 120 ? `${s.toFixed(1)}s` : s < 7200 ? `${(s / 60).toFixed(1)}m` : `${(s / 3600).toFixed(1)}h`;
}

function chip(status) { return h("span", { class: `chip s-${status.toLowerCase()}` }, status); }
function nodeNames(run) {
  const ids = [...new Set((run.placements || []).map((p) => p.node_id))];
  return ids.map((id) => (run.node_names || {})[id] || id).join(", ") || "-";
}
function say(text, kind = "error") { return h("p", { class: kind, role: kind === "error" ? "alert" : null }, text); }
function setMain(...kids) { document.getElementById("main").replaceChildren(...kids.filter((k) => k != null)); }

// ---- session -----------------------------------------------------------------------------------------------
function signedOut(message) {
  S.session = null;
  if (S.events) { S.events.close(); S.events = null; }
  document.getElementById("nav").hidden = true;
  const key = h("input", { type: "password", id: "api-key", autocomplete: "off", required: true,
                           placeholder: "fml_u_...", "aria-label": "API key" });
  const err = h("p", { class: "error", role: "alert" }, message || "");
  const form = h("form", { class: "signin", onsubmit: async (ev) => {
    ev.preventDefault();
    const r = await fetch("/ui/session", { method: "POST", credentials: "same-origin",
                                          headers: { "content-type": "application/json" },
                                          body: JSON.stringify({ api_key: key.value }) });
    const data = await r.json().catch(() => ({}));
    if (!r.ok) { err.textContent = data.detail || `HTTP ${r.status}`; return; }
    key.value = "";
    started(data);
  } }, h("h1", {}, "Sign in"), h("label", { for: "api-key" }, "API key"), key,
     h("button", { type: "submit", id: "signin" }, "Sign in"), err,
     h("p", { class: "muted" }, "A user key sees your runs; an admin key sees everything. `fedml dashboard` prints this address."));
  setMain(form);
  key.focus();
}

function started(session) {
  S.session = session;
  document.getElementById("nav").hidden = false;
  document.getElementById("nav-keys").hidden = !session.admin;
  document.getElementById("who").textContent = `${session.owner}${session.admin ? " (admin)" : ""}`;
  route();
}

async function signOut() {
  await fetch("/ui/session", { method: "DELETE", credentials: "same-origin",
                                headers: { "x-csrf-token": S.session ? S.session.csrf : "" } });
  location.hash = "#/runs";
  signedOut("Signed out.");
}

// ---- push: one stream for the page open --------------------------------------------------------------------
function listen(runId) {
  if (S.events) S.events.close();
  S.events = new EventSource("/api/v1/events" + (runId ? `?run=${encodeURIComponent(runId)}` : ""));
  for (const what of ["runs", "nodes", "endpoints", "run"]) {
    S.events.addEventListener(what, () => { // a burst of events: one refresh, told everything that moved
      if (S.page && S.page.wants && !S.page.wants.has(what)) return; // (what the page open does not show)
      S.moved.add(what);
      clearTimeout(S.timer);
      S.timer = setTimeout(() => {
        const moved = S.moved;
        S.moved = new Set();
        if (S.page && S.page.refresh) S.page.refresh(moved);
      }, 150);
    });
  }
}

// ---- router ------------------------------------------------------------------------------------------------
async function linkSignIn() {
  // A one-time code from `fedml dashboard` (#/signin/CODE): spent at once, and gone from the address bar and
  // the history. True when the address held one.
  const link = (location.hash.match(/^#\/signin\/(.+)$/) || [])[1];
  if (!link) return false;
  history.replaceState(null, "", "#/runs");
  const r = await fetch("/ui/session", { method: "POST", credentials: "same-origin",
                                        headers: { "content-type": "application/json" },
                                        body: JSON.stringify({ api_key: decodeURIComponent(link) }) });
  if (r.ok) started(await r.json());
  else signedOut("That sign-in link was used or has expired: run `fedml dashboard` again, or sign in with a key.");
  return true;
}

async function route() {
  if (await linkSignIn()) return;
  if (!S.session) return;
  const [, page, arg] = (location.hash || "#/runs").split("/");
  if (S.page && S.page.close) S.page.close();
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("here", a.getAttribute("href") === `#/${page}`);
  const pages = { runs: runsPage, run: runPage, queue: queuePage, nodes: nodesPage, endpoints: endpointsPage,
                  keys: keysPage };
  S.page = (pages[page] || runsPage)(arg ? decodeURIComponent(arg) : null);
  listen(page === "run" ? decodeURIComponent(arg || "") : null);
  document.getElementById("main").focus();
}

function view(title, load, controls, wants = ["runs", "nodes"]) {
  // A page: its title, `controls` (made once: what is typed there survives pushed refreshes) and a body rebuilt
  // by `load()` on each refresh (an error is said, not thrown). Refreshes may overlap (a pushed event, a
  // click): only the latest one started is shown.
  const body = h("div", { class: "body" });
  setMain(h("h1", {}, title), controls || null, body);
  let latest = 0;
  const page = {
    wants: new Set(wants),
    refresh: async () => {
      const mine = ++latest;
      let kids;
      try { kids = [].concat(await load(page)); } catch (e) {
        if (e.message === "not signed in") return;
        kids = [say(e.message)];
      }
      if (mine === latest) body.replaceChildren(...kids.flat(Infinity).filter((k) => k != null));
    },
  };
  page.refresh();
  return page;
}

// ---- runs --------------------------------------------------------------------------------------------------
function runsPage() {
  // Filtered and paged by the scheduler (GET /runs: status, q, mine, before): a page of 100 however many runs
  // there are. `pages` holds the cursors of the pages before this one (Newer goes back to them).
  const f = { status: "", mine: false, q: "", pages: [], before: null, next: null };
  const PAGE = 100;
  let page = null;
  let typing = null;
  const again = () => { f.pages = []; f.before = null; page.refresh(); };
  const search = h("input", { type: "search", placeholder: "filter by id, name, owner, node, label", id: "run-filter",
                              "aria-label": "filter runs", oninput: (e) => {
                                clearTimeout(typing); typing = setTimeout(() => { f.q = e.target.value.trim(); again(); }, 250); } });
  const mine = S.session.admin ? h("label", {}, h("input", { type: "checkbox", id: "runs-mine",
    onchange: (e) => { f.mine = e.target.checked; again(); } }), " Mine only") : null;
  page = view("Runs", async () => {
    const got = await api("/runs", { params: { limit: PAGE, status: f.status ? [f.status] : null, q: f.q || null,
                                               before: f.before, mine: f.mine || null, counts: true }, withHeaders: true });
    const runs = got.data;
    const counts = JSON.parse(got.headers.get("x-run-counts") || "{}");
    f.next = got.headers.get("x-next-before");
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const chips = h("div", { class: "chips" }, ["", ...Object.keys(counts).sort()].map((st) =>
      h("button", { type: "button", class: f.status === st ? "on" : "", "data-status": st || "all",
                    onclick: () => { f.status = st; again(); } },
        st ? `${st} ${counts[st]}` : `All ${total}`)));
    const rows = runs.map((r) => h("tr", {},
      h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.id)}` }, r.id)), h("td", {}, r.name), h("td", {}, r.owner),
      h("td", {}, chip(r.status), r.reason ? h("div", { class: "reason" }, r.reason) : null),
      h("td", {}, nodeNames(r)), h("td", {}, (r.gpus || []).join(",") || "-"), h("td", {}, r.priority),
      h("td", {}, r.attempt), h("td", {}, ago(r.created_at)), h("td", {}, duration(r)),
      h("td", {}, r.exit_code == null ? "-" : r.exit_code)));
    const newer = f.pages.length ? h("button", { type: "button", id: "newer", onclick: () => { f.before = f.pages.pop(); page.refresh(); } }, "← Newer") : null;
    const older = f.next ? h("button", { type: "button", id: "older", onclick: () => { f.pages.push(f.before); f.before = f.next; page.refresh(); } }, "Older →") : null;
    const where = h("span", { class: "muted" }, f.pages.length ? `page ${f.pages.length + 1}` : "newest first",
      f.q ? ` · matching “${f.q}”${f.next && runs.length < PAGE ? " (looked at the 5,000 runs after the page before: Older looks further)" : ""}` : "");
    return [chips, rows.length ? table(["Run", "Name", "Owner", "Status", "Nodes", "GPUs", "Priority", "Attempt",
                                        "Created", "Duration", "Exit"], rows, "runs") : say(f.q || f.status ? "No runs match here." : "No runs here yet.", "muted"),
            h("div", { class: "bar pager" }, newer, where, older)];
  }, h("div", { class: "bar" }, search, mine));
  return page;
}

function table(cols, rows, id) {
  return h("table", { id }, h("thead", {}, h("tr", {}, cols.map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, rows));
}

// ---- one run: details, timeline, actions, logs -------------------------------------------------------------
function runPage(runId) {
  let logs = null;
  let plots = null;
  const page = view(`Run ${runId}`, async (pg) => {
    const r = await api(`/runs/${encodeURIComponent(runId)}`);
    const rows = [["Name", r.name], ["Owner", r.owner], ["Status", chip(r.status)], ["Reason", r.reason || "-"],
                  ["Nodes", nodeNames(r)], ["GPUs", (r.gpus || []).join(",") || "-"], ["Attempt", r.attempt],
                  ["Created", ago(r.created_at)], ["Duration", duration(r)],
                  ["Exit code", r.exit_code == null ? "-" : r.exit_code], ["Job file", r.job_file || "-"]];
    const details = h("dl", { class: "details" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    // queued -> placed on n3 -> started -> lost: node offline -> attempt 2 on n1 -> ... -> where it is now
    const on = (ps) => (ps || []).map((p) => (r.node_names || {})[p.node_id] || p.node_id).join(", ") || "-";
    const at = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "");
    const steps = [[r.created_at, "queued"]];
    for (const a of r.attempts || []) {
      steps.push([a.started_at, `attempt ${a.attempt} ran on ${on(a.placements)}`]);
      steps.push([a.ended_at, `attempt ${a.attempt} ended: ${a.reason || "-"}`]);
    }
    if ((r.placements || []).length) steps.push([r.started_at, `attempt ${r.attempt} ${r.started_at ? "ran" : "placed"} on ${on(r.placements)}`]);
    steps.push([r.ended_at || r.updated_at, `${r.status}${r.reason ? `: ${r.reason}` : ""}`]);
    const timeline = h("ol", { class: "timeline", id: "timeline" }, steps.map(([ts, what]) => h("li", {}, h("span", { class: "muted" }, at(ts)), " ", what)));
    const ranks = (r.placements || []).length > 1 ? table(["Rank", "Node", "GPUs", "State", "Exit"],
      r.placements.map((p) => h("tr", {}, h("td", {}, p.rank), h("td", {}, (r.node_names || {})[p.node_id] || p.node_id),
        h("td", {}, p.gpus.join(",") || "-"), h("td", {}, chip(p.status)), h("td", {}, p.exit_code == null ? "-" : p.exit_code))),
      "ranks") : null;
    const err = h("span", { class: "error", role: "alert" });
    const act = (what, label, id, cls, after) => h("button", { type: "button", id, class: cls, onclick: async () => {
      try { after(await api(`/runs/${encodeURIComponent(runId)}/${what}`, { method: "POST" })); } catch (e) { err.textContent = e.message; }
    } }, label);
    const stop = !TERMINAL.has(r.status) ? act("stop", r.stop_requested ? "Stopping…" : "Stop", "stop", "danger", () => pg.refresh()) : null;
    const retry = TERMINAL.has(r.status) && !r.endpoint ? act("retry", "Retry", "retry", null,
      (again) => { location.hash = `#/run/${encodeURIComponent(again.id)}`; }) : null;
    if (!logs) logs = logView(r);
    else logs.update(r);
    if (!plots) plots = metricsView(r);
    // As submitted: the file's text when it came as one (`fedml launch`), else the document it was sent as.
    const spec = h("details", { id: "spec" }, h("summary", {}, r.job_text ? `Job file${r.job_file ? ` (${r.job_file})` : ""}, as submitted` : "Job spec"),
      h("pre", {}, r.job_text || JSON.stringify(r.job, null, 2)));
    const envBox = h("div", {});
    const env = h("details", { id: "env", ontoggle: async (ev) => {
      if (!ev.target.open || envBox.childElementCount) return;
      try {
        const got = await api(`/runs/${encodeURIComponent(runId)}/env`, { params: { rank: 0 } });
        envBox.replaceChildren(table(["Variable", "Value"], Object.entries(got.env).map(([k, v]) =>
          h("tr", {}, h("td", {}, k), h("td", { class: "value" }, v))), "env-table"), h("p", { class: "muted" }, `Rank 0, ${got.note}.`));
      } catch (e) { envBox.replaceChildren(say(e.message)); }
    } }, h("summary", {}, "Environment (secrets hidden)"), envBox);
    const latest = {};
    for (const a of [...(r.artifacts || [])].sort((x, y) => x.attempt - y.attempt)) latest[a.rank] = a;
    const arts = Object.values(latest).length ? [h("h2", {}, "Artifacts"), table(["Rank", "Attempt", "Files", "Size", ""],
      Object.values(latest).map((a) => h("tr", {}, h("td", {}, a.rank), h("td", {}, a.attempt), h("td", {}, a.files),
        h("td", {}, `${(a.size / 1024).toFixed(1)} KiB`), h("td", {}, h("a", {
          href: `/api/v1/runs/${encodeURIComponent(runId)}/artifacts/${a.rank}`, download: `${runId}-rank${a.rank}-artifacts.tar.gz` },
          "Download")))), "artifacts")] : null;
    return [h("div", { class: "bar" }, stop, retry, err), details, h("h2", {}, "Timeline"), timeline, ranks, arts, spec, env,
            h("h2", {}, "Metrics"), plots.el, h("h2", {}, "Logs"), logs.el];
  }, null, ["run"]);
  page.close = () => { if (logs) logs.close(); if (plots) plots.close(); };
  return page;
}

function logView(run) {
  // A virtual list over the run's log: only the rows in sight are in the page, read in windows of WINDOW lines
  // by position as they scroll into view (a 1,000,000-line log is 1,000,000 * LINE_H px of scroll and a few
  // hundred elements). Following: new lines arrive on the log stream and the view stays at the end.
  // One rank or one attempt (the filters): those lines only, one after another with no gaps, read from the start
  // in windows of RANK_WINDOW as they scroll into view (the scheduler filters them); "End" reads on to the end.
  const RANK_WINDOW = 5000;
  const st = { total: run.log_count || 0, windows: new Map(), rank: "", attempt: "", follow: !TERMINAL.has(run.status),
               stick: true, reader: null, run, q: "",
               rl: [], rcur: -1, rdone: false, rbusy: false, rheld: [] }; // the filtered lines, read so far
  const spacer = h("div", { class: "spacer" });
  const rows = h("div", { class: "rows" });
  const box = h("div", { class: "log", id: "log", tabindex: 0, role: "log", "aria-label": "run log" }, spacer, rows);
  const rank = h("select", { id: "rank", "aria-label": "rank", onchange: (e) => { st.rank = e.target.value; reset(); } },
    h("option", { value: "" }, "all ranks"), Array.from({ length: run.num_nodes || 1 }, (_, i) => h("option", { value: i }, `rank ${i}`)));
  const attempt = h("select", { id: "attempt", "aria-label": "attempt", onchange: (e) => { st.attempt = e.target.value; reset(); } },
    h("option", { value: "" }, "all attempts"), Array.from({ length: run.attempt || 1 }, (_, i) => h("option", { value: i + 1 }, `attempt ${i + 1}`)));
  const search = h("input", { type: "search", placeholder: "find in loaded lines", "aria-label": "find in log",
                              onchange: (e) => { st.q = e.target.value; draw(); } });
  const follow = h("button", { type: "button", id: "follow", onclick: () => { st.stick = !st.stick; follow.textContent = st.stick ? "Pause" : "Follow"; if (st.stick) toEnd(); } }, "Pause");
  const top = h("button", { type: "button", onclick: () => { st.stick = false; follow.textContent = "Follow"; box.scrollTop = 0; } }, "Start");
  const end = h("button", { type: "button", id: "log-end", onclick: () => toEnd() }, "End");
  const note = h("span", { class: "muted", id: "log-note" });
  const download = h("a", { href: `/api/v1/runs/${encodeURIComponent(run.id)}/logs?format=text`, download: `${run.id}.log` }, "Download");
  const el = h("div", {}, h("div", { class: "bar" }, rank, attempt, search, follow, top, end, download, note), box);

  const one = () => st.rank !== "" || st.attempt !== "";
  const wanted = (x) => (st.rank === "" || String(x.rank) === st.rank) && (st.attempt === "" || String(x.attempt) === st.attempt);
  const named = () => [st.rank !== "" ? `rank ${st.rank}` : "", st.attempt !== "" ? `attempt ${st.attempt}` : ""].filter(Boolean).join(", ");
  function count() { return one() ? st.rl.length + (st.rdone ? 0 : 1) : st.total; } // (+1: "reading…" row)
  function parse(text) { return text.split("\n").filter(Boolean).map((l) => JSON.parse(l)).filter((x) => "line" in x); }
  async function load(w) {
    if (st.windows.has(w)) return;
    st.windows.set(w, null);
    const text = await api(`/runs/${encodeURIComponent(run.id)}/logs`, { params: { after: w * WINDOW - 1, limit: WINDOW } });
    st.windows.set(w, parse(text));
    draw();
  }
  async function loadRank() {
    // The next RANK_WINDOW lines of the rank after the last one read; fewer than that: its end (for now).
    if (st.rbusy || st.rdone) return;
    st.rbusy = true;
    const want = `${st.rank}/${st.attempt}`;
    try {
      const got = parse(await api(`/runs/${encodeURIComponent(run.id)}/logs`,
                                  { params: { after: st.rcur, limit: RANK_WINDOW, rank: st.rank, attempt: st.attempt } }));
      if (want !== `${st.rank}/${st.attempt}`) return; // the filter changed meanwhile
      for (const x of got) st.rl.push(x);
      if (got.length) st.rcur = got[got.length - 1].pos;
      if (got.length < RANK_WINDOW) { // read to its end: lines the stream brought meanwhile follow on
        st.rdone = true;
        for (const x of st.rheld) if (x.pos > st.rcur) { st.rl.push(x); st.rcur = x.pos; }
        st.rheld = [];
      }
      note.textContent = `${named()}: ${st.rl.length.toLocaleString()} lines${st.rdone ? "" : " read so far"}`;
    } finally { st.rbusy = false; }
    draw();
  }
  async function toEnd() {
    if (one()) while (!st.rdone && one()) await loadRank();
    box.scrollTop = box.scrollHeight;
  }
  function lineAt(i) {
    if (one()) return st.rl[i];
    const w = st.windows.get(Math.floor(i / WINDOW));
    return w ? w.find((x) => x.pos === i) : undefined;
  }
  function draw() {
    const n = count();
    spacer.style.height = `${n * LINE_H}px`;
    const first = Math.max(0, Math.floor(box.scrollTop / LINE_H) - 20);
    const last = Math.min(n, first + Math.ceil(box.clientHeight / LINE_H) + 40);
    if (one()) { if (last >= st.rl.length) loadRank(); }
    else for (let w = Math.floor(first / WINDOW); w <= Math.floor(Math.max(first, last - 1) / WINDOW); w++) load(w);
    const out = [];
    for (let i = first; i < last; i++) {
      const x = lineAt(i);
      const cls = `row r${x ? x.rank % 6 : 0}${x && x.stream === "stderr" ? " err" : ""}${x && st.q && x.line.includes(st.q) ? " hit" : ""}`;
      out.push(h("div", { class: cls, style: `top:${i * LINE_H}px`, "data-pos": x ? x.pos : "" },
        h("span", { class: "meta" }, x ? `${x.rank}:${x.attempt}` : ""), x ? x.line : "…"));
    }
    rows.replaceChildren(...out);
  }
  function arrived(x) {
    // A line from the live stream: into its window (all ranks), and onto the one rank's list once that has been
    // read to its end (until then it is held, and added after what the read brings).
    const w = Math.floor(x.pos / WINDOW);
    if (!st.windows.get(w)) st.windows.set(w, []);
    st.windows.get(w).push(x);
    st.total = Math.max(st.total, x.pos + 1);
    if (one() && wanted(x)) {
      if (st.rdone && x.pos > st.rcur) { st.rl.push(x); st.rcur = x.pos; }
      else if (!st.rdone) st.rheld.push(x);
    }
  }
  async function tailStream() {
    // Follow: the NDJSON stream from the last position, rows appended as they are stored.
    const ctl = new AbortController();
    st.reader = ctl;
    try {
      const r = await fetch(`/api/v1/runs/${encodeURIComponent(run.id)}/logs?follow=true&after=${st.total - 1}`,
                            { credentials: "same-origin", signal: ctl.signal });
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        const lines = buf.split("\n");
        buf = lines.pop();
        for (const l of lines) {
          if (!l) continue;
          const x = JSON.parse(l);
          if ("line" in x) arrived(x);
        }
        draw();
        if (st.stick) box.scrollTop = box.scrollHeight;
      }
    } catch (e) { if (e.name !== "AbortError") console.warn(e); }
  }
  function reset() {
    Object.assign(st, { rl: [], rcur: -1, rdone: false, rbusy: false, rheld: [] });
    note.textContent = "";
    box.scrollTop = 0;
    draw();
  }
  let queued = false;
  box.addEventListener("scroll", () => {
    const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 2 * LINE_H;
    if (!atEnd && st.stick) { st.stick = false; follow.textContent = "Follow"; }
    if (!queued) { queued = true; requestAnimationFrame(() => { queued = false; draw(); }); }
  }, { passive: true });
  requestAnimationFrame(() => { draw(); if (st.follow) { box.scrollTop = box.scrollHeight; tailStream(); } });
  return {
    el,
    update(r) {
      st.run = r;
      for (let a = attempt.options.length; a <= r.attempt; a++) attempt.append(h("option", { value: a }, `attempt ${a}`));
      if (!st.follow && r.log_count > st.total) { st.total = r.log_count; draw(); }
    },
    close() { if (st.reader) st.reader.abort(); },
  };
}

// ---- a run's metrics: a small line plot per metric, a line per rank and attempt ---------------------------------
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
const RANK_COLOURS = ["#0b5fff", "#8e44ad", "#16a085", "#d35400", "#2980b9", "#c0392b"];

function metricsView(run) {
  // Read from GET /runs/ID/metrics (what the job reported with fedml.log or FEDML_METRIC lines); re-read every
  // 5 s while the run goes on.
  const el = h("div", { id: "metrics" });
  let timer = null;
  async function load() {
    let m;
    try { m = await api(`/runs/${encodeURIComponent(run.id)}/metrics`); } catch (e) { el.replaceChildren(say(e.message)); return; }
    const by = {};
    for (const s of m.series) (by[s.name] = by[s.name] || []).push(s);
    const names = Object.keys(by).sort();
    if (!names.length) {
      el.replaceChildren(h("p", { class: "muted" }, "No metrics: a job reports them with fedml.log({\"loss\": 0.3}, step=i), or by printing a line FEDML_METRIC {\"loss\": 0.3}."));
    } else {
      el.replaceChildren(h("div", { class: "plots" }, names.map((n) => plot(n, by[n]))),
        ...(m.ignored ? [h("p", { class: "muted" }, `${m.ignored} metric line(s) ignored; the latest: ${m.ignored_why}`)] : []));
    }
    clearTimeout(timer);
    if (!TERMINAL.has(m.status)) timer = setTimeout(load, 5000);
  }
  function plot(name, series) {
    const W = 320, H = 140, L = 44, B = 18;
    const pts = series.flatMap((s) => s.points);
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    const sx = (x) => L + (x1 === x0 ? 0.5 : (x - x0) / (x1 - x0)) * (W - L - 6);
    const sy = (y) => 6 + (y1 === y0 ? 0.5 : 1 - (y - y0) / (y1 - y0)) * (H - B - 12);
    const fmt = (v) => (Math.abs(v) >= 1000 || (v !== 0 && Math.abs(v) < 0.01) ? v.toExponential(1) : +v.toFixed(3));
    const lines = series.map((s) => svg("polyline", { fill: "none", "stroke-width": 1.5, stroke: RANK_COLOURS[s.rank % 6],
      "stroke-dasharray": s.attempt > 1 ? "4 2" : "none", points: s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") },
      svg("title", {}, `rank ${s.rank}, attempt ${s.attempt}: last ${fmt(s.last)}`)));
    const graph = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": `${name} by step` },
      svg("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, class: "axis" }), svg("line", { x1: L, y1: 4, x2: L, y2: H - B, class: "axis" }),
      svg("text", { x: L - 4, y: 12, "text-anchor": "end", class: "tick" }, fmt(y1)),
      svg("text", { x: L - 4, y: H - B, "text-anchor": "end", class: "tick" }, fmt(y0)),
      svg("text", { x: L, y: H - 4, class: "tick" }, fmt(x0)), svg("text", { x: W - 4, y: H - 4, "text-anchor": "end", class: "tick" }, fmt(x1)),
      ...lines);
    const last = series.map((s) => `${series.length > 1 ? `r${s.rank}/a${s.attempt} ` : ""}${fmt(s.last)}`).join(", ");
    return h("figure", { class: "plot", "data-metric": name }, graph, h("figcaption", {}, h("b", {}, name), ` ${last}`));
  }
  load();
  return { el, close() { clearTimeout(timer); } };
}

// ---- the queue ---------------------------------------------------------------------------------------------
function when(row, now) {
  // The estimated start (GET /queue): "about 12m from now", or why there is no basis for one.
  if (row.start_at == null) return h("span", { class: "muted" }, `no estimate: ${row.no_basis || "no basis"}`);
  const s = row.start_at - now;
  if (s <= 1) return "at the next pass (its GPUs are free)";
  const span = s < 3600 ? `${(s / 60).toFixed(0)}m` : s < 172800 ? `${(s / 3600).toFixed(1)}h` : `${(s / 86400).toFixed(1)}d`;
  return h("span", { title: `${new Date(row.start_at * 1000).toLocaleString()}, from ${row.basis}` }, `about ${span} from now`);
}

function queuePage() {
  const f = { mine: false };
  let page = null;
  const mine = S.session.admin ? h("label", {}, h("input", { type: "checkbox", id: "queue-mine",
    onchange: (e) => { f.mine = e.target.checked; page.refresh(); } }), " Mine only") : null;
  page = view("Queue", async () => {
    const [q, teams] = await Promise.all([api("/queue", { params: { limit: 500, mine: f.mine || null } }), api("/teams")]);
    const out = [h("p", { class: "muted" }, `${q.total} run${q.total === 1 ? "" : "s"} in line, in the order the scheduler `
      + "considers them: the team that used least for its shares first (fair share), then higher priority, then "
      + "first come first served; a run that fits may start before a bigger one ahead of it on nodes that one does "
      + "not hold (backfill).")];
    // Each team's quotas: what its runs hold now of each (`fedml team show`).
    const bars = teams.flatMap((t) => Object.entries(t.quotas || {}).map(([kind, cap]) => {
      const held = (t.quota_held || {})[kind] || 0;
      return h("tr", { "data-team": t.name }, h("td", {}, t.name), h("td", {}, kind),
        h("td", {}, h("meter", { min: 0, max: Math.max(cap, 1), value: Math.min(held, cap) })),
        h("td", {}, `${held} of ${cap} GPUs`));
    }));
    if (bars.length) out.push(h("h2", {}, "Team quotas"), table(["Team", "Quota", "", "Held"], bars, "quotas"),
      h("h2", {}, "In line"));
    if (!q.runs.length && !q.held.length) return [...out, say("Nothing waits: every run has a place.", "muted")];
    if (q.runs.length) out.push(table(["#", "Run", "Name", "Owner", "Priority", "GPUs", "Waiting", "Why", "Ahead of it", "Starts"],
      q.runs.map((r) => h("tr", { "data-run": r.id }, h("td", { class: "position" }, r.position),
        h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.id)}` }, r.id)), h("td", {}, r.name || "-"),
        h("td", {}, r.team ? `${r.owner} (${r.team})` : r.owner), h("td", {}, r.priority == null ? "-" : r.priority),
        h("td", {}, `${r.gpus * r.nodes}${r.gpu_type ? ` ${r.gpu_type}` : ""}${r.nodes > 1 ? ` (${r.nodes} nodes)` : ""}`),
        h("td", {}, ago(r.created_at)), h("td", { class: "reason" }, r.reason),
        h("td", { class: "ahead" }, r.ahead.runs ? `${r.ahead.runs} run${r.ahead.runs > 1 ? "s" : ""}, ${r.ahead.gpus} GPUs: `
          + r.ahead.owners.slice(0, 3).map((o) => `${o.owner}${o.team ? ` (${o.team})` : ""} ${o.runs}×/${o.gpus} GPUs`).join(", ")
          + (r.ahead.owners.length > 3 ? ", …" : "") : "nobody"),
        h("td", { class: "starts" }, when(r, q.now)))), "queue"));
    if (q.held.length) out.push(h("h2", {}, "Not in line yet"), table(["Run", "Name", "Owner", "Why"], q.held.map((r) =>
      h("tr", {}, h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.id)}` }, r.id)), h("td", {}, r.name),
        h("td", {}, r.owner), h("td", { class: "reason" }, r.reason))), "held"));
    return out;
  }, h("div", { class: "bar" }, mine));
  return page;
}

// ---- nodes -------------------------------------------------------------------------------------------------
function nodesPage() {
  return view("Nodes", async (page) => {
    const [nodes, active] = await Promise.all([api("/nodes"), api("/runs", { params: { status: ["STARTING", "RUNNING", "PREEMPTED"], limit: 10000 } })]);
    const holder = {};
    for (const r of active) for (const p of r.placements || []) if (!p.done) for (const g of p.gpus) holder[`${p.node_id}/${g}`] = r.id;
    return table(["Node", "State", "Last heartbeat", "Labels", "Price", "Runtimes", "GPUs", ""], nodes.map((n) => {
      const err = h("span", { class: "error", role: "alert" });
      const act = S.session.admin ? [h("button", { type: "button", class: "drain", "data-node": n.name, onclick: async () => {
        try {
          await api(`/nodes/${encodeURIComponent(n.name)}/drain`, { method: "POST", params: { undo: n.draining ? "true" : null } });
          page.refresh();
        } catch (e) { err.textContent = e.message; }
      } }, n.draining ? "Undrain" : "Drain"), " ", h("button", { type: "button", class: "remove danger", "data-node": n.name, onclick: async () => {
        // (as `fedml node remove`: its runs are lost and requeued by their retry policy, its key revoked)
        if (!confirm(`Remove node ${n.name}? Its runs become LOST (requeued by their retry policy) and its key is revoked.`)) return;
        try { await api(`/nodes/${encodeURIComponent(n.name)}`, { method: "DELETE" }); page.refresh(); } catch (e) { err.textContent = e.message; }
      } }, "Remove"), err] : null;
      const sampled = Object.fromEntries((n.gpu_samples || []).map((s) => [s.index, s]));
      const gpus = h("ul", { class: "gpus" }, (n.gpus || []).map((g) => {
        const run = holder[`${n.id}/${g.index}`];
        const s = sampled[g.index];
        const use = s ? ` ${s.util ?? "-"}% ${s.mem_used_mb != null ? `${(s.mem_used_mb / 1024).toFixed(1)}/${((s.mem_total_mb || g.memory_mb) / 1024).toFixed(0)} GB` : ""}` : "";
        const outside = (n.gpus_busy_outside || []).includes(g.index);
        return h("li", { class: outside ? "outside" : null }, `${g.index}: ${g.name}${g.memory_mb ? ` ${(g.memory_mb / 1024).toFixed(0)} GB` : ""}${use} `,
          run ? h("a", { href: `#/run/${encodeURIComponent(run)}` }, run)
            : outside ? h("span", { class: "error" }, "busy outside the scheduler") : h("span", { class: "muted" }, "free"));
      }));
      return h("tr", {}, h("td", {}, n.name), h("td", {}, chip(n.draining ? "DRAINING" : n.state)), h("td", {}, ago(n.last_seen)),
        h("td", {}, Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(" ") || "-"),
        h("td", {}, n.price_per_gpu_hour == null ? "-" : n.price_per_gpu_hour), h("td", {}, (n.runtimes || []).join(", ")),
        h("td", {}, gpus), h("td", {}, act));
    }), "nodes");
  });
}

// ---- endpoints ---------------------------------------------------------------------------------------------
function endpointsPage() {
  let page = null;
  const typed = {}; // replica counts typed but not sent yet survive the page's refreshes
  page = view("Endpoints", async () => {
    const eps = await api("/endpoints");
    if (!eps.length) return say("No endpoints (a job with job_type: serve makes one).", "muted");
    return eps.map((e) => {
      const t = e.traffic || {};
      const err = h("span", { class: "error", role: "alert" });
      const want = h("input", { type: "number", min: 0, max: 64, value: typed[e.name] ?? e.replicas, class: "replicas",
                                "aria-label": `replicas of ${e.name}`, oninput: (ev) => { typed[e.name] = ev.target.value; } });
      const scale = TERMINAL.has(e.status) ? null : h("form", { class: "bar scale", onsubmit: async (ev) => {
        ev.preventDefault();
        try {
          await api(`/endpoints/${encodeURIComponent(e.name)}/scale`, { method: "POST", body: { replicas: Number(want.value) } });
          delete typed[e.name];
          page.refresh();
        } catch (x) { err.textContent = x.message; }
      } }, h("label", {}, "Replicas ", want), h("button", { type: "submit" }, "Scale"),
         e.autoscale ? h("span", { class: "muted" }, `autoscaled within ${e.min_replicas}..${e.max_replicas}`) : null, err);
      const ms = (v) => (v == null ? "-" : `${v} ms`);
      return h("section", { class: "endpoint", "data-endpoint": e.name },
        h("h2", {}, e.name, " ", chip(e.status)),
        h("dl", { class: "details" },
          h("dt", {}, "Run"), h("dd", {}, h("a", { href: `#/run/${encodeURIComponent(e.run_id)}` }, e.run_id)),
          h("dt", {}, "Address"), h("dd", {}, `POST ${e.path}`), h("dt", {}, "Ready"), h("dd", {}, `${e.ready} of ${e.replicas}`),
          h("dt", {}, `Last ${(t.window_s || 300) / 60} min`), h("dd", { class: "traffic" },
            `${t.rate ?? 0} req/s, p50 ${ms(t.p50_ms)}, p99 ${ms(t.p99_ms)}, ${t.errors ?? 0} errors of ${t.answered ?? 0}; ${e.inflight} in flight now`)),
        scale,
        e.states.length ? table(["Replica", "State", "Node", "Port", "Restarts", "Last exit", "Since", "Message"], e.states.map((r) =>
          h("tr", {}, h("td", {}, r.index), h("td", {}, chip(r.state)), h("td", {}, r.node || r.node_id || "-"), h("td", {}, r.port),
            h("td", {}, r.restarts), h("td", {}, r.last_exit == null ? "-" : r.last_exit), h("td", {}, ago(r.since)),
            h("td", { class: "reason" }, r.message || ""))), `replicas-${e.name}`) : say(e.reason || "No replica reported yet.", "muted"));
    });
  }, null, ["endpoints", "runs"]);
  return page;
}

// ---- keys (admin) ------------------------------------------------------------------------------------------
function keysPage() {
  let page = null;
  const name = h("input", { id: "key-name", placeholder: "name (a user's name)", "aria-label": "key name" });
  const scope = h("select", { id: "key-scope", "aria-label": "scope" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin"),
    h("option", { value: "metrics" }, "metrics (reads /metrics only)"));
  const shown = h("p", { id: "new-key", class: "secret" }); // the key just created: shown once, here only
  const err = h("span", { class: "error", role: "alert" });
  const create = h("form", { class: "bar", onsubmit: async (ev) => {
    ev.preventDefault();
    err.textContent = "";
    try {
      const got = await api("/keys", { method: "POST", params: { name: name.value, scope: scope.value } });
      shown.textContent = `New key for ${got.key.name} (shown once): ${got.secret}`;
      name.value = "";
      page.refresh();
    } catch (e) { err.textContent = e.message; }
  } }, name, scope, h("button", { type: "submit", id: "create-key" }, "Create"), err);
  page = view("API keys", async () => {
    const keys = (await api("/keys")).filter((k) => ["admin", "user", "metrics"].includes(k.scope));
    return [table(["Key", "Name", "Scope", "Created", "State", ""], keys.map((k) => h("tr", {},
      h("td", {}, `${k.id} (${k.prefix}…)`), h("td", {}, k.name), h("td", {}, k.scope), h("td", {}, ago(k.created_at)),
      h("td", {}, k.revoked_at ? `revoked ${ago(k.revoked_at)}` : k.expires_at ? `expires ${new Date(k.expires_at * 1000).toLocaleString()}` : "active"),
      h("td", {}, k.revoked_at ? null : h("button", { type: "button", class: "revoke danger", "data-key": k.name, onclick: async () => {
        await api(`/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
        page.refresh();
      } }, "Revoke")))), "keys")];
  }, h("div", {}, create, shown));
  return page;
}

// ---- start -------------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("signout").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  if (await linkSignIn()) return;
  const r = await fetch("/ui/session", { credentials: "same-origin" });
  if (r.ok) started(await r.json());
  else signedOut("");
});
