// A minimal Connect protocol client (JSON codec) for the browser: unary calls
// as POST application/json, server streams as enveloped application/connect+json
// read with a ReadableStream reader. Nothing but fetch.

const PACKAGE = "jobtrace.v1";
const TOKEN_KEY = "jobtrace.token";

export class ConnectError extends Error {
  constructor(code, message, httpStatus = 0, details = []) {
    super(message || code);
    this.name = "ConnectError";
    this.code = code; // Connect code: "permission_denied", "unimplemented", ...
    this.httpStatus = httpStatus;
    this.details = details;
  }
}

// Connect's mapping of HTTP statuses without a Connect error body.
const HTTP_CODES = {
  400: "internal", 401: "unauthenticated", 403: "permission_denied", 404: "unimplemented",
  408: "deadline_exceeded", 429: "unavailable", 502: "unavailable", 503: "unavailable",
  504: "unavailable",
};

// The bearer token lives in sessionStorage only: never in the URL, never in localStorage.
export function getToken() {
  try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
}
export function setToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lasts as long as the page */ }
}

function headers(contentType) {
  const h = { "Content-Type": contentType, "Connect-Protocol-Version": "1" };
  const token = getToken();
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

function url(service, method) {
  return `/${PACKAGE}.${service}/${method}`;
}

async function errorFrom(response) {
  let code = HTTP_CODES[response.status] || "unknown";
  let message = `HTTP ${response.status}`;
  let details = [];
  try {
    const body = await response.json();
    if (body && typeof body.code === "string") code = body.code;
    if (body && typeof body.message === "string") message = body.message;
    if (body && Array.isArray(body.details)) details = body.details;
  } catch { /* not a Connect error body */ }
  return new ConnectError(code, message, response.status, details);
}

// One unary call: the response message as a plain object (proto3 JSON).
export async function unary(service, method, request = {}, { signal } = {}) {
  let response;
  try {
    response = await fetch(url(service, method), {
      method: "POST", headers: headers("application/json"), body: JSON.stringify(request), signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ConnectError("unavailable", `cannot reach the server: ${err.message}`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

function envelope(message) {
  const payload = new TextEncoder().encode(JSON.stringify(message));
  const out = new Uint8Array(5 + payload.length);
  new DataView(out.buffer).setUint32(1, payload.length, false);
  out.set(payload, 5);
  return out;
}

// A server-streaming call: an async iterator of response messages. It ends when
// the server ends the stream with no error, and throws ConnectError otherwise
// (including a stream cut before its end-of-stream message).
export async function* serverStream(service, method, request = {}, { signal } = {}) {
  let response;
  try {
    response = await fetch(url(service, method), {
      method: "POST", headers: headers("application/connect+json"), body: envelope(request), signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ConnectError("unavailable", `cannot reach the server: ${err.message}`);
  }
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = new Uint8Array(0);
  try {
    for (;;) {
      while (buffer.length >= 5) {
        const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
        const flags = view.getUint8(0);
        const length = view.getUint32(1, false);
        if (buffer.length < 5 + length) break;
        const data = buffer.subarray(5, 5 + length);
        buffer = buffer.slice(5 + length);
        if (flags & 0x01) throw new ConnectError("internal", "compressed message not asked for");
        const text = decoder.decode(data);
        if (flags & 0x02) {
          const end = text ? JSON.parse(text) : {};
          if (end.error) {
            throw new ConnectError(end.error.code || "unknown", end.error.message || "",
              response.status, end.error.details || []);
          }
          return;
        }
        yield JSON.parse(text);
      }
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === "AbortError") throw err;
        throw new ConnectError("unavailable", `stream broken: ${err.message}`);
      }
      if (chunk.done) throw new ConnectError("unavailable", "stream ended without its end message");
      const joined = new Uint8Array(buffer.length + chunk.value.length);
      joined.set(buffer);
      joined.set(chunk.value, buffer.length);
      buffer = joined;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// A field of a proto3 JSON object, by its proto name (snake_case) or its JSON
// name (lowerCamelCase): servers may print either.
export function f(obj, name, fallback = undefined) {
  if (obj == null) return fallback;
  if (name in obj) return obj[name];
  const camel = name.replace(/_([a-z0-9])/g, (_, c) => c.toUpperCase());
  return camel in obj ? obj[camel] : fallback;
}

// The RPCs the server has (console/features.json); an action whose RPC is
// missing is not shown.
let featuresPromise = null;
export function features() {
  if (!featuresPromise) {
    featuresPromise = fetch("/console/features.json")
      .then((r) => (r.ok ? r.json() : { services: {} }))
      .catch(() => ({ services: {} }));
  }
  return featuresPromise;
}
export async function has(service, method) {
  const all = (await features()).services || {};
  return (all[`${PACKAGE}.${service}`] || []).includes(method);
}

// Follows a server stream and opens it again when it breaks (with backoff),
// as the RPCs that never end ask: onMessage(message), onState("live" |
// "connecting" | "retrying" | "failed" | "ended", error). Errors a retry cannot
// mend (no permission, no such RPC, a bad request) stop it. Returns stop().
const FINAL = new Set(["permission_denied", "unauthenticated", "unimplemented", "invalid_argument",
  "not_found", "failed_precondition"]);
export function follow(service, method, request, { onMessage, onState, restartOnEnd = false }) {
  const controller = new AbortController();
  let delay = 500;
  (async () => {
    while (!controller.signal.aborted) {
      onState?.("connecting");
      try {
        let first = true;
        for await (const message of serverStream(service, method, request(), { signal: controller.signal })) {
          if (first) { onState?.("live"); first = false; delay = 500; }
          onMessage(message);
        }
        if (!restartOnEnd) { onState?.("ended"); return; }
      } catch (err) {
        if (controller.signal.aborted || err.name === "AbortError") return;
        if (FINAL.has(err.code)) { onState?.("failed", err); return; }
        onState?.("retrying", err);
      }
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => controller.abort();
}

// The roles a JWT token claims (its `roles`), read without checking its
// signature: a hint for which buttons to show, never a permission (the server
// decides). null when unknown: no token, or an opaque one (a tokens file's).
export function tokenRoles() {
  const parts = getToken().split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(b64.padEnd(Math.ceil(b64.length / 4) * 4, "=")));
    const roles = claims.roles;
    if (typeof roles === "string") return [roles];
    return Array.isArray(roles) ? roles.map(String) : [];
  } catch {
    return null;
  }
}

// What each role may do besides its own name (as the server's auth says).
const IMPLIES = { admin: ["reader", "submitter", "worker", "reviewer", "admin"], submitter: ["reader", "submitter"] };

// Whether to offer what needs `role`: yes unless the token's roles say no,
// and no once the server refused it to this token (PERMISSION_DENIED).
const refused = new Map(); // token -> Set of methods refused
export function mayCall(method, role) {
  if (refused.get(getToken())?.has(method)) return false;
  const roles = tokenRoles();
  if (roles === null) return true;
  return roles.some((r) => r === role || (IMPLIES[r] || []).includes(role));
}
export function refusedTo(method) {
  const token = getToken();
  if (!refused.has(token)) refused.set(token, new Set());
  refused.get(token).add(method);
}
