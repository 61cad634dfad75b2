// The live trace of a run through EventSource: GET /v1/runs/{id}/events?follow=true.
// The server replays, then follows, and ends with a `status` event. When the
// connection drops, EventSource reconnects by itself with Last-Event-ID and the
// server resumes right after that event: the list goes on with no gap and no
// repeat. Filters (level, audience, milestones) apply in the page, so changing
// them never reopens the stream.
import { getToken } from "./connect.js";
import { announce, durationMs, enumName, f, fmtDuration, h, statusLine, timeEl } from "./util.js";

const TYPES = ["started", "progress", "completed", "failed", "log"];
const LEVELS = ["debug", "info", "warn", "error", "critical"];
const MAX_EVENTS = 5000;

// What the page saw, for people debugging a feed (and for the browser tests):
// opens counts connections, duplicates events received twice.
const stats = (window.jobtraceConsole ||= {}).trace = { opens: 0, events: 0, duplicates: 0, errors: 0, ended: false, lastId: "" };

export function traceView(host, runId) {
  const level = h("select", { id: "t-level" }, LEVELS.map((l) => h("option", { value: l }, l)));
  level.value = "debug";
  const audience = h("fieldset.audience", {},
    h("legend", {}, "Audience"),
    ["all", "business", "technical"].map((value) => h("label", {},
      h("input", { type: "radio", name: "t-audience", value, checked: value === "all" }), ` ${value}`)));
  const milestones = h("input", { id: "t-milestones", type: "checkbox" });
  const followBox = h("input", { id: "t-follow", type: "checkbox", checked: true });
  const status = h("p.stream-status", { id: "trace-status", role: "status" }, "connecting…");
  const list = h("ol.trace", { id: "trace-lines", "aria-label": "Trace events", tabindex: "0" });
  const empty = h("p.muted", { id: "trace-empty" }, "No event matches yet.");
  const counter = h("span.muted", { id: "trace-count" });

  host.append(
    h("form.filters.trace-filters", { "aria-label": "Trace filters", onsubmit: (e) => e.preventDefault() },
      h("div.field", {}, h("label", { for: "t-level" }, "Minimum level"), level),
      audience,
      h("div.field.check", {}, milestones, h("label", { for: "t-milestones" }, "Milestones only")),
      h("div.field.check", {}, followBox, h("label", { for: "t-follow" }, "Follow (keep the newest in view)"))),
    h("div.section-head", {}, status, counter),
    empty, list);

  const seen = new Set();
  const rows = [];
  let shown = 0;
  const count = () => { counter.textContent = `${shown} of ${rows.length} events shown`; };

  function visible(event) {
    const min = LEVELS.indexOf(level.value);
    const lv = LEVELS.indexOf(enumName(f(event, "level") || "LEVEL_INFO", "LEVEL"));
    if (lv < min) return false;
    const wanted = host.querySelector('input[name="t-audience"]:checked')?.value || "all";
    const category = enumName(f(event, "category") || "CATEGORY_TECHNICAL", "CATEGORY");
    if (wanted !== "all" && category !== wanted) return false;
    if (milestones.checked && !f(event, "milestone")) return false;
    return true;
  }

  function refilter() {
    shown = 0;
    for (const { row, event } of rows) {
      row.hidden = !visible(event);
      if (!row.hidden) shown += 1;
    }
    empty.hidden = shown > 0;
    count();
    if (followBox.checked) scrollToEnd();
  }

  function scrollToEnd() {
    list.scrollTop = list.scrollHeight;
  }

  function add(event, type) {
    const key = f(event, "id") || `${f(event, "sequence")}`;
    stats.events += 1;
    if (seen.has(key)) { stats.duplicates += 1; return; }
    seen.add(key);
    const lv = enumName(f(event, "level") || "LEVEL_INFO", "LEVEL");
    const category = enumName(f(event, "category") || "CATEGORY_TECHNICAL", "CATEGORY");
    const duration = fmtDuration(durationMs(f(event, "duration")));
    const message = (category === "business" && f(event, "user_message")) || f(event, "message") || "";
    const extra = [];
    const percent = f(event, "percent");
    if (percent) extra.push(`${Math.round(percent)}%`);
    if (duration) extra.push(duration);
    const error = f(event, "error");
    if (error && f(error, "message") && f(error, "message") !== message) extra.push(f(error, "message"));
    const row = h("li", { dataset: { sequence: String(f(event, "sequence", "")), type, level: lv, category,
      milestone: f(event, "milestone") ? "true" : "false" } },
    h("span.seq", {}, `#${f(event, "sequence", "")}`),
    timeEl(f(event, "timestamp")),
    h(`span.level.level-${lv}`, {}, lv),
    h("span.type", {}, type),
    h("span.cat", {}, category),
    h("span.nodeid", {}, f(event, "node_id") || ""),
    h("span.msg", {}, f(event, "milestone") ? h("strong", {}, "★ milestone: ") : null, message,
      extra.length ? h("span.muted", {}, ` (${extra.join(", ")})`) : null));
    rows.push({ row, event });
    list.append(row);
    row.hidden = !visible(event);
    if (!row.hidden) { shown += 1; empty.hidden = true; }
    if (rows.length > MAX_EVENTS) { // keep the newest
      const old = rows.shift();
      if (!old.row.hidden) shown -= 1;
      old.row.remove();
    }
    count();
    if (followBox.checked) scrollToEnd();
  }

  for (const input of [level, milestones, ...audience.querySelectorAll("input")]) {
    input.addEventListener("change", refilter);
  }
  followBox.addEventListener("change", () => { if (followBox.checked) scrollToEnd(); });
  // Scrolling up stops following; reaching the end again resumes it.
  list.addEventListener("scroll", () => {
    const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 8;
    if (!atEnd && followBox.checked && document.activeElement === list) followBox.checked = false;
  });

  const params = new URLSearchParams({ follow: "true" });
  // EventSource cannot send headers: the token rides in the query, which the
  // server accepts for this endpoint alone and never logs.
  const token = getToken();
  if (token) params.set("access_token", token);
  const source = new EventSource(`/v1/runs/${encodeURIComponent(runId)}/events?${params}`);
  stats.opens = 0; stats.events = 0; stats.duplicates = 0; stats.errors = 0; stats.ended = false;
  source.addEventListener("open", () => {
    stats.opens += 1;
    statusLine(status, stats.opens > 1 ? `● following (reconnected ${stats.opens - 1}×, resumed after the last event)`
      : "● following", "live");
  });
  source.addEventListener("error", () => {
    stats.errors += 1;
    if (source.readyState === EventSource.CLOSED) statusLine(status, "stream closed by the server", "failed");
    else if (!stats.ended) statusLine(status, "reconnecting…", "retrying");
  });
  for (const type of TYPES) {
    source.addEventListener(type, (message) => {
      stats.lastId = message.lastEventId;
      try { add(JSON.parse(message.data), type); } catch (err) { console.warn("trace event", err); }
    });
  }
  source.addEventListener("status", (message) => {
    stats.ended = true;
    source.close(); // the run ended: do not reconnect
    let state = "";
    try { state = enumName(f(JSON.parse(message.data), "state"), "RUN_STATE"); } catch { /* keep it blank */ }
    statusLine(status, `run ended${state ? ` (${state.replace(/_/g, " ")})` : ""}: the trace is complete`, "ended");
    announce("trace complete");
  });
  return () => source.close();
}
