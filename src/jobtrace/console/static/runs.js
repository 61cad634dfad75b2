// Runs: the live list (WatchRuns with include_active: no reload, no polling)
// and the paged history (ListJobs / ListWorkflows with page tokens).
import { f, follow, unary } from "./connect.js";
import {
  STATES, announce, errorText, h, isLive, isTerminal, progressBar, replaceChildren, runLink, stateBadge,
  stateName, stateWords, statusLine, timeEl,
} from "./util.js";

const LIVE_LIMIT = 200;
const PAGE_SIZE = 25;

export function runsView(main) {
  const filters = { state: "", kind: "", service: "", name: "" };
  const stateOptions = [h("option", { value: "" }, "any state"),
    ...STATES.map((s) => h("option", { value: s }, stateWords(s)))];
  const form = h("form.filters", { "aria-label": "Run filters" },
    h("div.field", {}, h("label", { for: "f-state" }, "State"),
      h("select", { id: "f-state", name: "state" }, stateOptions)),
    h("div.field", {}, h("label", { for: "f-kind" }, "Kind"),
      h("select", { id: "f-kind", name: "kind" },
        h("option", { value: "" }, "jobs and workflows"),
        h("option", { value: "job" }, "jobs"),
        h("option", { value: "workflow" }, "workflows"))),
    h("div.field", {}, h("label", { for: "f-service" }, "Service (jobs)"),
      h("input", { id: "f-service", name: "service", type: "text", autocomplete: "off" })),
    h("div.field", {}, h("label", { for: "f-name" }, "Name (workflows)"),
      h("input", { id: "f-name", name: "name", type: "text", autocomplete: "off" })),
    h("div.field.actions", {}, h("button", { type: "submit" }, "Apply filters"),
      h("button", { type: "reset" }, "Clear")));

  const liveStatus = h("p.stream-status", { id: "live-status", role: "status" }, "connecting…");
  const liveBody = h("tbody", { id: "live-runs" });
  const liveEmpty = h("p.muted", { id: "live-empty" }, "No run has changed yet; active runs appear here.");
  const liveTable = runTable("Live runs", liveBody);

  const historyKind = h("select", { id: "h-kind" },
    h("option", { value: "workflow" }, "workflows"), h("option", { value: "job" }, "jobs"));
  const historyBody = h("tbody", { id: "history-runs" });
  const historyStatus = h("p.muted", { role: "status" });
  const refresh = h("button", { type: "button" }, "Refresh");
  const prev = h("button", { type: "button", disabled: true }, "◀ Newer");
  const next = h("button", { type: "button", disabled: true }, "Older ▶");
  const pageLabel = h("span.page", {}, "page 1");

  main.append(
    h("h2", {}, "Runs"),
    form,
    h("section", { "aria-labelledby": "live-h" },
      h("div.section-head", {}, h("h3", { id: "live-h" }, "Live"), liveStatus),
      liveEmpty, liveTable),
    h("section", { "aria-labelledby": "history-h" },
      h("div.section-head", {}, h("h3", { id: "history-h" }, "History"),
        h("div.field.inline", {}, h("label", { for: "h-kind" }, "Show"), historyKind)),
      runTable("Run history", historyBody),
      h("div.pager", {}, prev, pageLabel, next, refresh), historyStatus),
  );

  // ---- live list
  const rows = new Map(); // run id -> {row, updated}
  let stopLive = null;

  function startLive() {
    stopLive?.();
    rows.clear();
    liveBody.replaceChildren();
    liveEmpty.hidden = false;
    liveTable.hidden = true;
    stopLive = follow("JobService", "WatchRuns", () => {
      // The state filter applies here, not on the server: a run that leaves
      // the state must leave the list too, and the server would not say.
      const request = { includeActive: true };
      if (filters.kind) request.kind = filters.kind === "job" ? "RUN_KIND_JOB" : "RUN_KIND_WORKFLOW";
      if (filters.service) request.services = [filters.service];
      if (filters.name) request.workflowNames = [filters.name];
      return request;
    }, {
      restartOnEnd: true,
      onMessage(message) {
        const job = f(message, "job");
        const workflow = f(message, "workflow");
        if (job) upsert(job, "job");
        else if (workflow) upsert(workflow, "workflow");
      },
      onState(state, err) {
        const text = { connecting: "connecting…", live: "● live", retrying: `reconnecting (${errorText(err)})`,
          failed: `stopped: ${errorText(err)}`, ended: "ended" }[state] || state;
        statusLine(liveStatus, text, state);
      },
    });
  }

  function upsert(run, kind) {
    const id = f(run, "id");
    const updated = Date.parse(f(run, "updated_at") || 0) || 0;
    const known = rows.get(id);
    if (known && known.updated > updated) return; // never go backwards
    if (filters.state && stateName(f(run, "state")) !== filters.state) {
      if (known) {
        known.row.remove();
        rows.delete(id);
        liveEmpty.hidden = rows.size > 0;
        liveTable.hidden = rows.size === 0;
      }
      return;
    }
    const row = runRow(run, kind);
    if (known) {
      known.row.replaceWith(row);
    } else {
      liveBody.prepend(row);
      if (rows.size >= LIVE_LIMIT) {
        const last = liveBody.lastElementChild;
        rows.delete(last.dataset.runId);
        last.remove();
      }
      announce(`${kind} ${f(run, "name") || f(f(run, "spec"), "service") || id} ${stateWords(f(run, "state"))}`);
    }
    rows.set(id, { row, updated });
    liveEmpty.hidden = true;
    liveTable.hidden = false;
  }

  // ---- history
  let tokens = [""]; // tokens[i]: the page token of page i
  let page = 0;
  let historyCall = null;

  async function loadHistory() {
    historyCall?.abort();
    const controller = new AbortController();
    historyCall = controller;
    const kind = historyKind.value;
    const request = { pageSize: PAGE_SIZE, pageToken: tokens[page] };
    if (filters.state) request.state = `RUN_STATE_${filters.state}`;
    if (kind === "job" && filters.service) request.service = filters.service;
    if (kind === "workflow" && filters.name) request.name = filters.name;
    statusLine(historyStatus, "loading…");
    prev.disabled = next.disabled = true;
    try {
      const response = kind === "job"
        ? await unary("JobService", "ListJobs", request, { signal: controller.signal })
        : await unary("JobService", "ListWorkflows", request, { signal: controller.signal });
      const runs = f(response, kind === "job" ? "jobs" : "workflows") || [];
      replaceChildren(historyBody, runs.map((run) => runRow(run, kind)));
      const token = f(response, "next_page_token") || "";
      tokens = tokens.slice(0, page + 1);
      if (token) tokens.push(token);
      next.disabled = !token;
      prev.disabled = page === 0;
      pageLabel.textContent = `page ${page + 1}`;
      statusLine(historyStatus, runs.length ? "" : "Nothing matches.");
    } catch (err) {
      if (err.name === "AbortError") return;
      statusLine(historyStatus, `Could not list runs: ${errorText(err)}`, "error");
    }
  }

  prev.addEventListener("click", () => { if (page > 0) { page -= 1; loadHistory(); } });
  next.addEventListener("click", () => { if (tokens[page + 1]) { page += 1; loadHistory(); } });
  refresh.addEventListener("click", () => loadHistory());
  historyKind.addEventListener("change", () => { tokens = [""]; page = 0; loadHistory(); });

  function readFilters() {
    const data = new FormData(form);
    filters.state = data.get("state") || "";
    filters.kind = data.get("kind") || "";
    filters.service = String(data.get("service") || "").trim();
    filters.name = String(data.get("name") || "").trim();
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    readFilters();
    if (filters.kind) historyKind.value = filters.kind;
    tokens = [""]; page = 0;
    startLive();
    loadHistory();
  });
  form.addEventListener("reset", () => {
    setTimeout(() => form.requestSubmit(), 0);
  });

  startLive();
  loadHistory();
  return () => { stopLive?.(); historyCall?.abort(); };
}

function runTable(caption, body) {
  return h("div.table-wrap", {},
    h("table.runs", {},
      h("caption.visually-hidden", {}, caption),
      h("thead", {}, h("tr", {},
        h("th", { scope: "col" }, "Run"),
        h("th", { scope: "col" }, "State"),
        h("th", { scope: "col" }, "Progress"),
        h("th", { scope: "col", class: "wide" }, "Attempt / steps"),
        h("th", { scope: "col", class: "wide" }, "Created"),
        h("th", { scope: "col", class: "wide" }, "Updated"))),
      body));
}

function runRow(run, kind) {
  const id = f(run, "id");
  const state = f(run, "state");
  let title;
  let percent;
  let detail;
  if (kind === "workflow") {
    const progress = f(run, "progress") || {};
    title = f(run, "name") || id;
    percent = f(progress, "percent", 0);
    detail = `${f(progress, "completed_steps", 0)} of ${f(progress, "total_steps", 0)} steps`;
  } else {
    const spec = f(run, "spec") || {};
    const step = f(run, "step_name");
    title = step ? `${step} (step)` : f(spec, "service") || id;
    percent = isTerminal(state) && stateName(state) === "COMPLETED" ? 100 : f(f(run, "progress"), "percent", 0);
    detail = `attempt ${f(run, "attempt", 0)}`;
  }
  return h("tr", { dataset: { runId: id, kind, state: stateName(state), live: String(isLive(state)) } },
    h("th", { scope: "row" },
      h("span.kind", {}, kind === "workflow" ? "workflow" : "job"), " ",
      runLink(id, title), h("div.id", {}, id)),
    h("td", {}, stateBadge(state)),
    h("td", {}, progressBar(percent, `progress of ${title}`)),
    h("td.wide", {}, detail),
    h("td.wide", {}, timeEl(f(run, "created_at"))),
    h("td.wide", {}, timeEl(f(run, "updated_at"))));
}
