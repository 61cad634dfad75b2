// Small DOM and formatting helpers shared by the views.
import { f } from "./connect.js";

// h("tag.class", {attr: value, onclick: fn}, child, ...): an element. Text
// children are text nodes, never HTML.
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replaceChildren(el, ...children) {
  el.replaceChildren();
  append(el, children);
}

// RunState names without the prefix, and whether they are terminal.
export const STATES = [
  "QUEUED", "PENDING", "RUNNING", "PAUSED", "WAITING_FOR_HUMAN",
  "COMPLETED", "FAILED", "CANCELLED", "TERMINATED", "TIMED_OUT",
];
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "TERMINATED", "TIMED_OUT"]);
const STATE_BY_NUMBER = {
  1: "QUEUED", 2: "RUNNING", 3: "COMPLETED", 4: "FAILED", 5: "CANCELLED", 6: "TERMINATED",
  7: "TIMED_OUT", 8: "PENDING", 9: "PAUSED", 10: "WAITING_FOR_HUMAN",
};
// A symbol beside the word, so that a state reads without colour.
const STATE_MARK = {
  QUEUED: "…", PENDING: "⋯", RUNNING: "▶", PAUSED: "⏸", WAITING_FOR_HUMAN: "✋",
  COMPLETED: "✓", FAILED: "✗", CANCELLED: "⊘", TERMINATED: "■", TIMED_OUT: "⌛", UNKNOWN: "?",
};

export function stateName(value) {
  if (typeof value === "number") return STATE_BY_NUMBER[value] || "UNKNOWN";
  if (!value) return "UNKNOWN";
  return String(value).replace(/^RUN_STATE_/, "");
}
export const isTerminal = (state) => TERMINAL.has(stateName(state));
// Live: not ended (PAUSED and WAITING_FOR_HUMAN runs are live too).
export const isLive = (state) => STATES.includes(stateName(state)) && !isTerminal(state);

// A state as words: WAITING_FOR_HUMAN is a gate (or a workflow) waiting for approval.
const STATE_WORDS = { WAITING_FOR_HUMAN: "waiting for approval" };
export function stateWords(value) {
  const name = stateName(value);
  return STATE_WORDS[name] || name.replace(/_/g, " ").toLowerCase();
}

export function stateBadge(value) {
  const name = stateName(value);
  return h(`span.badge.state-${name.toLowerCase()}`, { "data-state": name },
    h("span", { "aria-hidden": "true" }, STATE_MARK[name] || "?"), " ", stateWords(name));
}

export function enumName(value, prefix) {
  if (value === undefined || value === null) return "";
  return String(value).replace(new RegExp(`^${prefix}_`), "").toLowerCase();
}

// A progress bar with its number as text beside it.
export function progressBar(percent, label) {
  const value = Math.max(0, Math.min(100, Number(percent) || 0));
  const text = `${Math.round(value)}%`;
  return h("span.progress", {},
    h("progress", { max: "100", value: String(value), "aria-label": label || "progress" }, text),
    h("span.progress-text", {}, text));
}

export function parseTime(ts) {
  if (!ts) return null;
  const t = Date.parse(ts);
  return Number.isNaN(t) ? null : t;
}

export function fmtTime(ts) {
  const t = parseTime(ts);
  if (t === null) return "";
  const d = new Date(t);
  const today = new Date();
  const time = d.toLocaleTimeString([], { hour12: false });
  return d.toDateString() === today.toDateString() ? time : `${d.toISOString().slice(0, 10)} ${time}`;
}

export function timeEl(ts) {
  const t = parseTime(ts);
  if (t === null) return h("span.muted", {}, "—");
  return h("time", { datetime: new Date(t).toISOString(), title: new Date(t).toISOString() }, fmtTime(ts));
}

export function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms) || ms < 0) return "";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const hr = Math.floor(m / 60);
  return `${hr} h ${m - hr * 60} min`;
}

// proto3 JSON Duration "1.5s" -> milliseconds.
export function durationMs(value) {
  if (!value) return null;
  const m = /^(-?\d+(?:\.\d+)?)s$/.exec(String(value));
  return m ? Number(m[1]) * 1000 : null;
}

export function between(start, end) {
  const a = parseTime(start);
  if (a === null) return null;
  const b = parseTime(end) ?? Date.now();
  return b - a;
}

export function runKind(id) {
  return String(id).startsWith("wf_") ? "workflow" : "job";
}

export function runLink(id, text) {
  return h("a", { href: `#/runs/${encodeURIComponent(id)}` }, text || id);
}

export function jsonBlock(value, label) {
  return h("pre.json", { tabindex: "0", "aria-label": label || "JSON" },
    value === undefined ? "—" : JSON.stringify(value, null, 2));
}

export function errorText(err) {
  if (!err) return "";
  return err.code ? `${err.code.replace(/_/g, " ")}: ${err.message}` : String(err.message || err);
}

// A polite live region that screen readers announce.
export function announce(text) {
  const region = document.getElementById("announcer");
  if (region) region.textContent = text;
}

export function statusLine(el, text, kind = "") {
  el.textContent = text;
  el.dataset.kind = kind;
}

export { f };
