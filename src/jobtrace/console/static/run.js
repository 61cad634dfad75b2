// One run: its state and actions, the workflow's steps as a dependency graph
// (WatchWorkflow), the live trace (EventSource), annotations, attestations
// (with Verify and the DSSE download), and request context and payload.
import { f, features, follow, has, mayCall, refusedTo, unary } from "./connect.js";
import {
  announce, between, durationMs, enumName, errorText, fmtDuration, h, isTerminal, jsonBlock,
  progressBar, replaceChildren, runKind, runLink, stateBadge, stateName, stateWords, statusLine, timeEl,
} from "./util.js";
import { traceView } from "./trace.js";

export function runView(main, runId) {
  const kind = runKind(runId);
  const stops = [];
  const title = h("h2", {}, kind === "workflow" ? "Workflow " : "Job ", h("code", {}, runId));
  const summary = h("div.summary", { id: "run-summary" }, h("p.muted", {}, "loading…"));
  const watchStatus = h("p.stream-status", { role: "status", id: "run-status" });
  const actions = h("div.actions", { id: "run-actions", role: "group", "aria-label": "Actions" });
  const actionStatus = h("p", { id: "action-status", role: "status" });
  const graphSection = h("section", { "aria-labelledby": "steps-h", hidden: kind !== "workflow" },
    h("h3", { id: "steps-h" }, "Steps"));
  const graph = h("div.graph-wrap", { id: "steps" });
  const stepDetail = h("div.step-detail", { id: "step-detail", "aria-live": "polite" });
  graphSection.append(graph, stepDetail);

  const annotations = h("div", { id: "annotations" });
  const attestations = h("div", { id: "attestations" });
  const context = h("div", { id: "context" });
  const traceHost = h("div", { id: "trace" });

  main.append(
    h("p.crumbs", {}, h("a", { href: "#/runs" }, "← Runs")),
    title,
    h("div.run-grid", {},
      h("div.run-main", {},
        h("div.section-head", {}, summary, watchStatus),
        actions, actionStatus,
        graphSection),
      h("section.run-trace", { "aria-labelledby": "trace-h" }, h("h3", { id: "trace-h" }, "Trace"), traceHost)),
    h("section", { "aria-labelledby": "ann-h" }, h("h3", { id: "ann-h" }, "Annotations"), annotations),
    h("section", { "aria-labelledby": "att-h" }, h("h3", { id: "att-h" }, "Attestations"), attestations),
    h("section", { "aria-labelledby": "ctx-h" },
      h("h3", { id: "ctx-h" }, "Request context and payload"), context),
  );

  let current = null; // the run as last seen
  let ended = false;
  const jobs = new Map(); // step job id -> Job (timings, worker)
  let selectedStep = null;

  const renderAll = () => {
    if (!current) return;
    renderSummary(summary, current, kind, selectStep);
    renderActions(actions, actionStatus, current, kind, runId, onRun);
    if (kind === "workflow") renderGraph(graph, current, jobs, selectStep, selectedStep);
  };

  function showStep() {
    const step = (f(current, "steps") || []).find((s) => f(s, "name") === selectedStep);
    if (step) renderStepDetail(stepDetail, step, jobs.get(f(step, "job_id")), current, onRun);
  }

  function selectStep(name) {
    selectedStep = name;
    renderAll();
    showStep();
  }

  function onRun(run) {
    // Never backwards: a call's answer may arrive after the watch's newer news.
    const seen = Date.parse(f(current, "updated_at") || "") || 0;
    if (current && (Date.parse(f(run, "updated_at") || "") || 0) < seen) return;
    const wasEnded = ended;
    current = run;
    ended = isTerminal(f(run, "state"));
    renderAll();
    if (selectedStep) showStep();
    if (ended && !wasEnded) {
      announce(`run ${stateName(f(run, "state")).toLowerCase()}`);
      loadAnnotations(annotations, runId);
      loadAttestations(attestations, context, runId, kind, current);
    }
  }

  async function loadJobs() {
    if (kind !== "workflow") return;
    try {
      const response = await unary("JobService", "ListJobs", { workflowId: runId, pageSize: 1000 });
      for (const job of f(response, "jobs") || []) jobs.set(f(job, "id"), job);
      renderAll();
    } catch (err) {
      console.warn("step jobs", err);
    }
  }

  const watchMethod = kind === "workflow" ? "WatchWorkflow" : "WatchJob";
  stops.push(follow("JobService", watchMethod,
    () => (kind === "workflow" ? { workflowId: runId } : { jobId: runId }), {
      onMessage(message) {
        const run = f(message, kind === "workflow" ? "workflow" : "job");
        const changed = f(message, "changed_job");
        if (changed) jobs.set(f(changed, "id"), changed);
        if (run) onRun(run);
        else if (changed && selectedStep) showStep();
      },
      onState(state, err) {
        const text = { connecting: "connecting…", live: "● live", retrying: `reconnecting (${errorText(err)})`,
          failed: `could not follow: ${errorText(err)}`, ended: "run ended" }[state] || state;
        statusLine(watchStatus, text, state);
        if (state === "failed" && !current) replaceChildren(summary, h("p.error", {}, errorText(err)));
        if (state === "ended") loadJobs();
      },
    }));
  loadJobs();
  // A decision on a gate is recorded as annotations at once.
  stepDetail.addEventListener("decided", () => loadAnnotations(annotations, runId));
  stops.push(traceView(traceHost, runId));
  loadAnnotations(annotations, runId);
  loadAttestations(attestations, context, runId, kind, null);
  return () => stops.forEach((stop) => stop());
}

function renderSummary(el, run, kind, onSelect) {
  const state = f(run, "state");
  const facts = [];
  let percent;
  if (kind === "workflow") {
    const progress = f(run, "progress") || {};
    percent = f(progress, "percent", 0);
    facts.push(["Name", f(run, "name")],
      ["Steps", `${f(progress, "completed_steps", 0)} of ${f(progress, "total_steps", 0)} completed`]);
    // The gates waiting for people: each opens its step (and its Approve/Reject).
    const waiting = (f(run, "steps") || []).filter((s) => stateName(f(s, "state")) === "WAITING_FOR_HUMAN");
    if (waiting.length) {
      facts.push(["Waiting for approval", waiting.map((s) => h("button.link", {
        type: "button", dataset: { gate: f(s, "name") }, onclick: () => onSelect(f(s, "name")),
      }, `step ${f(s, "name")}`))]);
    }
  } else {
    const spec = f(run, "spec") || {};
    percent = stateName(state) === "COMPLETED" ? 100 : f(f(run, "progress"), "percent", 0);
    facts.push(["Service", f(spec, "service")], ["Attempt", String(f(run, "attempt", 0))],
      ["Worker", f(run, "worker_id") || "—"]);
    const message = f(f(run, "progress"), "message");
    if (message) facts.push(["Progress", message]);
    if (f(run, "workflow_id")) facts.push(["Workflow", runLink(f(run, "workflow_id"))]);
    if (f(run, "approval")) facts.push(...approvalFacts(f(run, "approval"), state));
  }
  if (f(run, "parent_run_id")) facts.push(["Rerun of", runLink(f(run, "parent_run_id"))]);
  const started = f(run, "first_started_at") || f(run, "started_at");
  facts.push(
    ["Created", timeEl(f(run, "created_at"))],
    ["Started", timeEl(started)],
    ["Ended", timeEl(f(run, "completed_at"))],
    ["Duration", fmtDuration(between(started, f(run, "completed_at"))) || "—"],
    ["Submitted by", f(run, "submitted_by") || "—"],
  );
  const labels = f(run, "labels") || f(f(run, "spec"), "labels") || {};
  if (Object.keys(labels).length) {
    facts.push(["Labels", Object.entries(labels).map(([k, v]) => h("span.tag", {}, `${k}=${v}`))]);
  }
  const failure = f(run, "failure");
  if (failure && (f(failure, "reason") || f(failure, "code"))) {
    facts.push(["Failure", `${f(failure, "code") || ""} ${f(failure, "reason") || ""}`.trim()]);
  }
  replaceChildren(el,
    h("div.headline", {}, stateBadge(state), progressBar(percent, "run progress")),
    h("dl.facts", {}, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])));
}

// ---- actions: each shown when the listener serves its RPC, the run's state
// allows it (as the server's state machine, domain/states.py ACTIONS, says),
// and the caller may (every run action needs the submitter role: a JWT's
// roles claim hides them up front; a PERMISSION_DENIED hides them for this
// token from then on). A refusal (FAILED_PRECONDITION: the run moved on
// meanwhile) shows the server's words.
const ACTION_ROLE = "submitter";
const LIVE_JOB = ["PENDING", "QUEUED", "RUNNING", "WAITING_FOR_HUMAN"];
const LIVE_WORKFLOW = ["QUEUED", "RUNNING", "WAITING_FOR_HUMAN", "PAUSED"];
const PAUSABLE = ["QUEUED", "RUNNING", "WAITING_FOR_HUMAN"];
const among = (states) => (s) => states.includes(stateName(s));

// Every rerun is a new idempotency key: a second click is a second rerun.
const requestId = () => `console-${crypto.randomUUID()}`;

function actionList(kind, runId) {
  const reasonOf = () => document.getElementById("action-reason")?.value.trim() || "";
  if (kind === "workflow") {
    return [
      { id: "cancel", label: "Cancel", method: "CancelWorkflow", when: among(LIVE_WORKFLOW),
        request: () => ({ workflowId: runId, reason: reasonOf() || "cancelled from the console" }) },
      { id: "terminate", label: "Terminate", method: "TerminateWorkflow", when: among(LIVE_WORKFLOW),
        request: () => ({ workflowId: runId, reason: reasonOf() || "terminated from the console" }) },
      { id: "pause", label: "Pause", method: "PauseWorkflow", when: among(PAUSABLE),
        request: () => ({ workflowId: runId, reason: reasonOf() || "paused from the console" }) },
      { id: "resume", label: "Resume", method: "ResumeWorkflow", when: among(["PAUSED"]),
        request: () => ({ workflowId: runId }) },
      { id: "rerun", label: "Rerun", method: "RerunWorkflow", when: isTerminal,
        request: () => ({ workflowId: runId, requestId: requestId(), reason: reasonOf() }),
        result: "workflow" },
    ];
  }
  return [
    { id: "cancel", label: "Cancel", method: "CancelJob", when: among(LIVE_JOB),
      request: () => ({ jobId: runId, reason: reasonOf() || "cancelled from the console" }) },
    { id: "terminate", label: "Terminate", method: "TerminateJob", when: among(LIVE_JOB),
      request: () => ({ jobId: runId, reason: reasonOf() || "terminated from the console" }) },
    // A workflow's step is rerun with its workflow (RerunJob refuses it).
    { id: "rerun", label: "Rerun", method: "RerunJob", when: (s, run) => isTerminal(s) && !f(run, "workflow_id"),
      request: () => ({ jobId: runId, requestId: requestId(), reason: reasonOf() }),
      result: "job" },
  ];
}

async function renderActions(el, status, run, kind, runId, onRun) {
  el.latestRun = run;
  const known = (await features()).services?.["jobtrace.v1.JobService"] || [];
  const latest = el.latestRun; // the newest: renders that crossed the await agree
  const state = f(latest, "state");
  // From here on no await: two renders cannot interleave and add a button twice.
  if (!el.querySelector("#action-reason")) {
    el.append(h("label", { for: "action-reason" }, "Reason"),
      h("input", { id: "action-reason", type: "text", maxlength: "1000", autocomplete: "off" }));
  }
  for (const action of actionList(kind, runId)) {
    let button = el.querySelector(`[data-action="${action.id}"]`);
    const wanted = known.includes(action.method) && action.when(state, latest)
      && mayCall(action.method, ACTION_ROLE);
    if (!wanted) { button?.remove(); continue; }
    if (button) continue;
    button = h("button", { type: "button", dataset: { action: action.id } }, action.label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      statusLine(status, `${action.label}…`);
      try {
        const response = await unary("JobService", action.method, action.request());
        if (action.result) {
          const created = f(response, action.result);
          const id = f(created, "id");
          replaceChildren(status, `${action.label}: new run `,
            h("a", { id: "rerun-link", href: `#/runs/${encodeURIComponent(id)}` }, id));
          status.dataset.kind = "ok";
          status.dataset.newRun = id;
        } else {
          statusLine(status, `${action.label}: done.`, "ok");
          // The run as the call left it, before the watch says so.
          const after = f(response, kind);
          if (after && f(after, "id") === runId) onRun(after);
        }
      } catch (err) {
        if (err.code === "permission_denied" || err.code === "unimplemented") {
          refusedTo(action.method);
          button.remove();
        }
        statusLine(status, `${action.label} refused: ${errorText(err)}`, "error");
      } finally {
        button.disabled = false;
      }
    });
    el.append(button);
  }
  el.hidden = !el.querySelector("button");
}

// ---- the steps as a graph, layered by depth (a step's depth is one more than
// its deepest dependency's).
function depths(steps) {
  const byName = new Map(steps.map((s) => [f(s, "name"), s]));
  const memo = new Map();
  const depth = (name, seen = new Set()) => {
    if (memo.has(name)) return memo.get(name);
    if (seen.has(name)) return 0;
    seen.add(name);
    const deps = (f(byName.get(name), "depends_on") || []).filter((d) => byName.has(d));
    const d = deps.length ? 1 + Math.max(...deps.map((x) => depth(x, seen))) : 0;
    memo.set(name, d);
    return d;
  };
  return steps.map((s) => depth(f(s, "name")));
}

function renderGraph(host, workflow, jobs, onSelect, selected) {
  const steps = f(workflow, "steps") || [];
  if (!steps.length) { replaceChildren(host, h("p.muted", {}, "No steps yet.")); return; }
  const levels = depths(steps);
  const layers = [];
  steps.forEach((step, i) => { (layers[levels[i]] ||= []).push(step); });
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "edges");
  svg.setAttribute("aria-hidden", "true");
  const grid = h("ol.graph", { "aria-label": "Steps by dependency depth" },
    layers.map((layer, depth) => h("li.layer", {},
      h("span.layer-label", {}, `depth ${depth}`),
      h("ul", {}, layer.map((step) => h("li", {}, stepNode(step, jobs, onSelect, selected)))))));
  // A redraw must not take keyboard focus away from the node that had it.
  const focused = host.contains(document.activeElement) ? document.activeElement.dataset.step : null;
  replaceChildren(host, svg, grid);
  if (focused) host.querySelector(`.node[data-step="${CSS.escape(focused)}"]`)?.focus();
  requestAnimationFrame(() => drawEdges(host, svg, steps));
  if (!host.dataset.observed) {
    host.dataset.observed = "1";
    new ResizeObserver(() => {
      const current = host.querySelector("svg.edges");
      if (current) drawEdges(host, current, steps);
    }).observe(host);
  }
}

function stepNode(step, jobs, onSelect, selected) {
  const name = f(step, "name");
  const job = jobs.get(f(step, "job_id"));
  const state = f(step, "state");
  const started = f(job, "first_started_at") || f(job, "started_at");
  const duration = started ? fmtDuration(between(started, f(job, "completed_at"))) : "";
  const deps = f(step, "depends_on") || [];
  const percent = stateName(state) === "COMPLETED" ? 100 : f(f(step, "progress"), "percent", 0);
  const approval = f(step, "approval");
  const meta = approval
    ? `approval gate · ${approvalCount(approval)}`
    : [`attempt ${f(step, "attempt", 0)}`, duration ? ` · ${duration}` : ""];
  return h("button.node", {
    type: "button", "data-step": name, "data-state": stateName(state),
    "aria-pressed": selected === name ? "true" : "false",
    onclick: () => onSelect(name),
  },
  h("span.node-name", {}, name),
  stateBadge(state),
  progressBar(percent, `progress of step ${name}`),
  h("span.node-meta", {}, meta),
  h("span.node-deps", {}, deps.length ? `after ${deps.join(", ")}` : "no dependencies"));
}

function drawEdges(host, svg, steps) {
  const box = host.getBoundingClientRect();
  svg.setAttribute("width", String(host.scrollWidth));
  svg.setAttribute("height", String(host.scrollHeight));
  svg.replaceChildren();
  const nodeOf = (name) => host.querySelector(`.node[data-step="${CSS.escape(name)}"]`);
  for (const step of steps) {
    const to = nodeOf(f(step, "name"));
    for (const dep of f(step, "depends_on") || []) {
      const from = nodeOf(dep);
      if (!from || !to) continue;
      const a = from.getBoundingClientRect();
      const b = to.getBoundingClientRect();
      const ox = host.scrollLeft - box.left;
      const oy = host.scrollTop - box.top;
      let d;
      if (b.left >= a.right - 1) { // layers side by side
        const x1 = a.right + ox; const y1 = a.top + a.height / 2 + oy;
        const x2 = b.left + ox; const y2 = b.top + b.height / 2 + oy;
        const mx = (x1 + x2) / 2;
        d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`;
      } else { // layers stacked (narrow screens)
        const x1 = a.left + a.width / 2 + ox; const y1 = a.bottom + oy;
        const x2 = b.left + b.width / 2 + ox; const y2 = b.top + oy;
        const my = (y1 + y2) / 2;
        d = `M${x1},${y1} C${x1},${my} ${x2},${my} ${x2},${y2}`;
      }
      const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
      path.setAttribute("d", d);
      svg.append(path);
    }
  }
}

// "1 of 2 approvals": how far an approval gate has got.
function approvalCount(approval) {
  const need = f(f(approval, "gate"), "min_approvals", 0) || 1;
  return `${f(approval, "approvals", 0)} of ${need} approval${need === 1 ? "" : "s"}`;
}

// An approval gate's approvers and the decisions so far.
function approvalFacts(approval, state) {
  const gate = f(approval, "gate") || {};
  const rows = [
    ["Gate", stateWords(state)],
    ["Approvers", (f(gate, "approvers") || []).map((a) => h("span.tag", {}, a))],
    ["Approvals", approvalCount(approval)],
  ];
  if (f(approval, "deadline")) rows.push(["Deadline", timeEl(f(approval, "deadline"))]);
  const decisions = f(approval, "decisions") || [];
  rows.push(["Decisions", decisions.length
    ? h("ul.decisions", {}, decisions.map((d) => {
      const verdict = enumName(f(d, "disposition"), "APPROVAL_DISPOSITION");
      return h("li", { dataset: { approver: f(d, "approver") || "", disposition: verdict } },
        `${verdict === "approved" ? "✓" : "✗"} ${verdict} by ${f(d, "approver") || "?"}`,
        f(d, "comment") ? `: “${f(d, "comment")}”` : "", " ", timeEl(f(d, "decided_at")));
    }))
    : "none yet"]);
  return rows;
}

async function renderStepDetail(el, step, job, workflow, onRun) {
  const name = f(step, "name");
  const jobId = f(step, "job_id");
  const state = f(step, "state");
  const approval = f(step, "approval");
  // Redraw only on news: a redraw would drop a comment being typed.
  const key = JSON.stringify([step, job || null]);
  if (el.dataset.renderedKey === key) return;
  el.dataset.renderedKey = key;
  const started = f(job, "first_started_at") || f(job, "started_at");
  const rows = [["Job", runLink(jobId)], ["State", stateBadge(state)]];
  if (approval) {
    rows.push(...approvalFacts(approval, state));
  } else {
    rows.push(["Attempt", String(f(step, "attempt", 0))], ["Worker", f(job, "worker_id") || "—"],
      ["Started", timeEl(started)], ["Ended", timeEl(f(job, "completed_at"))],
      ["Duration", fmtDuration(between(started, f(job, "completed_at"))) || "—"]);
  }
  const failure = f(job, "failure");
  if (failure && f(failure, "reason")) rows.push(["Failure", `${f(failure, "code") || ""} ${f(failure, "reason")}`]);
  const approve = h("div.actions.approve", { role: "group", "aria-label": `Decide step ${name}` });
  approve.hidden = true;
  const payload = h("div.payload");
  replaceChildren(el, h("h4", {}, `Step ${name}`),
    h("dl.facts", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])), approve, payload);
  if (approval) {
    el.dataset.payloadOf = "";
  } else if (jobId && el.dataset.payloadOf !== jobId) {
    el.dataset.payloadOf = jobId;
    el.payload = undefined;
    unary("JobService", "GetJob", { jobId })
      .then((response) => { el.payload = payloadOf(f(f(response, "job"), "spec")); })
      .catch((err) => { el.payload = { error: errorText(err) }; })
      .finally(() => { if (el.dataset.payloadOf === jobId) showPayload(el); });
  } else {
    showPayload(el);
  }
  // The comment field and the decision's status line outlive redraws of the
  // detail (kept on the element, per step): a refusal stays readable when the
  // gate moves on.
  if (el.approvalStep !== name) {
    el.approvalStep = name;
    el.comment = h("input", { id: "approval-comment", type: "text", maxlength: "1000", autocomplete: "off" });
    el.approvalStatus = h("p.approval-status", { id: "approval-status", role: "status" });
  }
  const status = el.approvalStatus;
  if (status.textContent) { approve.append(status); approve.hidden = false; }
  if (stateName(state) !== "WAITING_FOR_HUMAN" || !mayCall("ApproveStep", "reviewer")) return;
  if (!(await has("JobService", "ApproveStep")) || el.dataset.renderedKey !== key) return;
  const decide = (disposition, label) => h("button", { type: "button", dataset: { action: label.toLowerCase() },
    onclick: async (event) => {
      const button = event.currentTarget;
      button.disabled = true;
      statusLine(status, `${label}…`);
      try {
        const response = await unary("JobService", "ApproveStep", {
          workflowId: f(workflow, "id"), step: name, disposition, comment: el.comment.value.trim() });
        statusLine(status, `${label}: recorded.`, "ok");
        el.comment.value = "";
        const after = f(response, "workflow");
        if (after) onRun(after);
        el.dispatchEvent(new CustomEvent("decided"));
      } catch (err) {
        if (err.code === "permission_denied" || err.code === "unimplemented") {
          refusedTo("ApproveStep");
          approve.querySelectorAll("button").forEach((b) => b.remove());
        }
        statusLine(status, `${label} refused: ${errorText(err)}`, "error");
      } finally {
        button.disabled = false;
      }
    } }, label);
  approve.append(h("label", { for: "approval-comment" }, "Comment"), el.comment,
    decide("APPROVAL_DISPOSITION_APPROVED", "Approve"),
    decide("APPROVAL_DISPOSITION_REJECTED", "Reject"), status);
  approve.hidden = false;
}

function showPayload(el) {
  const host = el.querySelector(".payload");
  if (!host || el.payload === undefined) return;
  replaceChildren(host, h("h4", {}, "Payload (as GetJob returns it)"),
    el.payload && el.payload.error ? h("p.error", {}, el.payload.error) : jsonBlock(el.payload, "step payload"));
}

// A JobSpec's payload: the Struct, or the exact JSON (base64 bytes) when the
// server sent that form.
function payloadOf(spec) {
  const payload = f(spec, "payload");
  if (payload !== undefined) return payload;
  const exact = f(spec, "payload_json");
  if (!exact) return {};
  try {
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(exact), (ch) => ch.charCodeAt(0))));
  } catch {
    return exact;
  }
}

// ---- annotations
async function loadAnnotations(el, runId, token = "", append = false) {
  if (!append) replaceChildren(el, h("p.muted", {}, "loading…"));
  try {
    const response = await unary("AttestationService", "ListAnnotations",
      { runId, pageSize: 100, pageToken: token });
    const items = f(response, "annotations") || [];
    const next = f(response, "next_page_token");
    let body = el.querySelector("tbody");
    if (!append || !body) {
      body = h("tbody");
      replaceChildren(el,
        h("div.section-tools", {}, h("button", { type: "button", onclick: () => loadAnnotations(el, runId) }, "Refresh")),
        h("div.table-wrap", {}, h("table", {},
          h("caption.visually-hidden", {}, "Annotations"),
          h("thead", {}, h("tr", {}, ["Key", "Value", "Actor", "Scope", "Recorded by", "Time"]
            .map((c) => h("th", { scope: "col" }, c)))),
          body)));
    }
    el.querySelector(".more")?.remove();
    for (const a of items) {
      const actor = f(a, "actor") || {};
      const scope = enumName(f(a, "scope"), "ANNOTATION_SCOPE");
      body.append(h("tr", {},
        h("th", { scope: "row" }, h("code", {}, f(a, "key"))),
        h("td", {}, h("code.value", {}, JSON.stringify(f(a, "value")))),
        h("td", {}, `${enumName(f(actor, "kind"), "ACTOR_KIND")} ${f(actor, "id") || ""}`),
        h("td", {}, scope + (f(a, "scope_id") ? ` ${f(a, "scope_id")}` : "") + (f(a, "attempt") ? ` #${f(a, "attempt")}` : "")),
        h("td", {}, f(a, "recorded_by") || "—"),
        h("td", {}, timeEl(f(a, "create_time")))));
    }
    if (!body.children.length) body.append(h("tr", {}, h("td", { colspan: "6" }, "No annotations.")));
    if (next) {
      el.append(h("button.more", { type: "button", onclick: () => loadAnnotations(el, runId, next, true) }, "More annotations"));
    }
  } catch (err) {
    replaceChildren(el, h("p.error", {}, `Could not list annotations: ${errorText(err)}`));
  }
}

// ---- attestations, with Verify and the DSSE download; the newest one's
// evidence fills "Request context and payload".
async function loadAttestations(el, contextEl, runId, kind, run) {
  const request = kind === "workflow" ? { workflowId: runId } : { jobId: runId };
  try {
    const response = await unary("AttestationService", "ListAttestations",
      { ...request, pageSize: 100, view: "ATTESTATION_VIEW_FULL" });
    const items = f(response, "attestations") || [];
    const rows = items.map((a) => attestationRow(a));
    replaceChildren(el,
      h("div.section-tools", {}, h("button", { type: "button",
        onclick: () => loadAttestations(el, contextEl, runId, kind, run) }, "Refresh")),
      items.length
        ? h("div.table-wrap", {}, h("table.attestations", {},
          h("caption.visually-hidden", {}, "Attestations"),
          h("thead", {}, h("tr", {}, ["Key", "Type", "State", "Chain", "Recorded by", "Time", "Verify"]
            .map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, rows)))
        : h("p.muted", {}, "No attestation yet: one is written when the run (or an attempt) ends."));
    renderContext(contextEl, runId, kind, items);
  } catch (err) {
    replaceChildren(el, h("p.error", {}, `Could not list attestations: ${errorText(err)}`));
    renderContext(contextEl, runId, kind, []);
  }
}

function attestationRow(a) {
  const key = f(a, "key");
  const verdict = h("span.verdict", { role: "status" });
  const download = h("span.download");
  const verify = h("button", { type: "button", dataset: { verify: key } }, "Verify");
  verify.addEventListener("click", async () => {
    verify.disabled = true;
    statusLine(verdict, "checking…");
    try {
      const v = await unary("AttestationService", "VerifyAttestation", { key });
      const checks = [["digest", "digest_valid"], ["signature", "signature_valid"], ["chain", "chain_valid"]];
      if (f(v, "annotations_attested")) checks.push(["annotations", "annotations_valid"]);
      const parts = checks.map(([label, field]) => `${label} ${f(v, field) ? "✓" : "✗"}`);
      if (f(v, "previous_pruned")) parts.push("previous pruned");
      const valid = Boolean(f(v, "valid"));
      verdict.dataset.valid = String(valid);
      verdict.textContent = `${valid ? "✓ valid" : "✗ NOT valid"} (${parts.join(", ")})`
        + (f(v, "reason") ? `: ${f(v, "reason")}` : "");
    } catch (err) {
      verdict.dataset.valid = "error";
      statusLine(verdict, `could not verify: ${errorText(err)}`, "error");
    } finally {
      verify.disabled = false;
    }
  });
  const dsse = h("button", { type: "button", dataset: { dsse: key } }, "DSSE envelope");
  dsse.addEventListener("click", async () => {
    dsse.disabled = true;
    try {
      const response = await unary("AttestationService", "GetAttestation", { key, includeEnvelope: true });
      const env = f(response, "envelope") || {};
      // The DSSE JSON envelope: payload and sig are base64, as proto3 JSON prints bytes.
      const envelope = {
        payloadType: f(env, "payload_type"),
        payload: f(env, "payload"),
        signatures: (f(env, "signatures") || []).map((s) => ({ keyid: f(s, "keyid"), sig: f(s, "sig") })),
      };
      const blob = new Blob([JSON.stringify(envelope, null, 2)], { type: "application/json" });
      const name = `${key.replace(/[^A-Za-z0-9._-]+/g, "_")}.dsse.json`;
      replaceChildren(download, h("a", { href: URL.createObjectURL(blob), download: name }, `Download ${name}`));
    } catch (err) {
      statusLine(download, `no envelope: ${errorText(err)}`, "error");
    } finally {
      dsse.disabled = false;
    }
  });
  return h("tr", { dataset: { key } },
    h("th", { scope: "row" }, h("code", {}, key)),
    h("td", {}, enumName(f(a, "type"), "ATTESTATION_TYPE").replace(/_/g, " ")),
    h("td", {}, stateBadge(f(a, "state"))),
    h("td", {}, `#${f(a, "chain_sequence", "")}`),
    h("td", {}, f(a, "recorded_by") || "—"),
    h("td", {}, timeEl(f(a, "create_time"))),
    h("td.verify", {}, verify, " ", dsse, verdict, download));
}

async function renderContext(el, runId, kind, attestations) {
  const parts = [];
  const withEvidence = attestations.filter((a) => f(a, "data"));
  const latest = withEvidence[withEvidence.length - 1];
  if (latest) {
    const data = f(latest, "data") || {};
    parts.push(h("p.muted", {}, "As attested in ", h("code", {}, f(latest, "key")),
      " (sanitised and redacted by the server):"),
    h("h4", {}, "Request context"), jsonBlock(data.request_context ?? data.requestContext, "request context"));
    if (data.job_payload !== undefined) parts.push(h("h4", {}, "Payload"), jsonBlock(data.job_payload, "payload"));
  }
  if (kind === "job" && !(latest && f(latest, "data")?.job_payload !== undefined)) {
    try {
      const response = await unary("JobService", "GetJob", { jobId: runId });
      const payload = payloadOf(f(f(response, "job"), "spec") || {});
      parts.push(h("h4", {}, "Payload (as GetJob returns it)"), jsonBlock(payload, "payload"));
    } catch (err) {
      parts.push(h("p.error", {}, `Could not read the job: ${errorText(err)}`));
    }
  }
  if (!parts.length) parts.push(h("p.muted", {}, "The request context appears with the run's first attestation; "
    + "a step's payload shows in its job (select a step, then its job)."));
  replaceChildren(el, parts);
}
