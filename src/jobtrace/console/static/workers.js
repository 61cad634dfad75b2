// Workers: who is connected, what each holds, heartbeats, draining
// (WorkerService.WatchWorkers: the snapshot, then every change).
import { f, follow, has } from "./connect.js";
import { errorText, h, parseTime, replaceChildren, runLink, statusLine, timeEl } from "./util.js";

export function workersView(main) {
  const status = h("p.stream-status", { id: "workers-status", role: "status" }, "connecting…");
  const body = h("tbody", { id: "workers" });
  const empty = h("p.muted", { id: "workers-empty" }, "No worker is connected.");
  const table = h("div.table-wrap", {}, h("table.workers", {},
    h("caption.visually-hidden", {}, "Connected workers"),
    h("thead", {}, h("tr", {}, ["Worker", "Status", "Holds", "Heartbeat", "Services", "Counts", "Connected"]
      .map((c) => h("th", { scope: "col" }, c)))),
    body));
  main.append(h("h2", {}, "Workers"), h("div.section-head", {}, status), empty, table);

  const workers = new Map(); // session id -> worker
  let stop = null;
  let ticker = null;

  function render() {
    const list = [...workers.values()].sort((a, b) =>
      (parseTime(f(a, "connected_at")) || 0) - (parseTime(f(b, "connected_at")) || 0));
    replaceChildren(body, list.map(workerRow));
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
  }

  (async () => {
    if (!(await has("WorkerService", "WatchWorkers"))) {
      statusLine(status, "This server does not serve the fleet over HTTP (WorkerService.WatchWorkers): "
        + "use `jobtrace workers` instead.", "failed");
      empty.hidden = true;
      table.hidden = true;
      return;
    }
    stop = follow("WorkerService", "WatchWorkers", () => ({}), {
      restartOnEnd: true,
      onMessage(message) {
        const change = f(message, "change");
        if (f(message, "snapshot_done") !== undefined) { render(); return; }
        if (!change) return;
        const type = String(f(change, "type") || "");
        const worker = f(change, "worker") || {};
        const key = f(worker, "session_id") || f(worker, "worker_id");
        if (/DISCONNECTED|EXPIRED|UNMATCHED/.test(type)) workers.delete(key);
        else workers.set(key, worker);
        render();
      },
      onState(state, err) {
        if (state === "connecting") workers.clear();
        const text = { connecting: "connecting…", live: "● live", retrying: `reconnecting (${errorText(err)})`,
          failed: `stopped: ${errorText(err)}`, ended: "ended" }[state] || state;
        statusLine(status, text, state);
      },
    });
    // Heartbeat ages are redrawn from the data in hand (no call to the server).
    ticker = setInterval(() => {
      for (const cell of body.querySelectorAll("[data-heartbeat]")) {
        cell.textContent = ago(cell.dataset.heartbeat);
      }
    }, 1000);
  })();
  return () => { stop?.(); if (ticker) clearInterval(ticker); };
}

function ago(ts) {
  const t = parseTime(ts);
  if (t === null) return "—";
  const s = Math.max(0, Math.round((Date.now() - t) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.floor(s / 60)} min ago`;
}

function workerRow(w) {
  const held = f(w, "held_jobs") || [];
  const draining = Boolean(f(w, "draining"));
  const labels = Object.entries(f(w, "labels") || {});
  return h("tr", { dataset: { worker: f(w, "worker_id") } },
    h("th", { scope: "row" }, f(w, "worker_id"),
      h("div.id", {}, `${f(w, "version") || ""} ${f(w, "replica") || ""}`.trim()),
      labels.length ? h("div", {}, labels.map(([k, v]) => h("span.tag", {}, `${k}=${v}`))) : null),
    h("td", {}, draining ? h("span.badge.state-paused", {}, "⏸ draining") : h("span.badge.state-running", {}, "▶ taking work"),
      h("div", {}, `${f(w, "free_slots", 0)} of ${f(w, "max_concurrency", 0)} slots free`)),
    h("td", {}, held.length
      ? h("ul.plain", {}, held.map((j) => h("li", {}, runLink(f(j, "job_id")),
        ` attempt ${f(j, "attempt", 0)}`, f(j, "service") ? ` (${f(j, "service")})` : "", " since ", timeEl(f(j, "since")))))
      : h("span.muted", {}, "nothing")),
    h("td", {}, h("span", { dataset: { heartbeat: f(w, "last_heartbeat") || "" } }, ago(f(w, "last_heartbeat")))),
    h("td", {}, (f(w, "services") || []).join(", ")),
    h("td", {}, `${f(w, "completed", 0)} done, ${f(w, "failed", 0)} failed, ${f(w, "lease_losses", 0)} leases lost`),
    h("td", {}, timeEl(f(w, "connected_at"))));
}
