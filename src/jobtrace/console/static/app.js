// The console's entry point: the token field and a hash router between views.
// Routes: #/runs, #/runs/<run id>, #/workers.
import { getToken, setToken } from "./connect.js";
import { runsView } from "./runs.js";
import { runView } from "./run.js";
import { workersView } from "./workers.js";

const main = document.getElementById("main");
let cleanup = null;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/runs";
  const parts = hash.split("/").filter(Boolean).map(decodeURIComponent);
  if (cleanup) {
    try { cleanup(); } catch (err) { console.warn("view cleanup", err); }
    cleanup = null;
  }
  main.replaceChildren();
  let section = "runs";
  if (parts[0] === "workers") {
    section = "workers";
    cleanup = workersView(main);
  } else if (parts[0] === "runs" && parts[1]) {
    cleanup = runView(main, parts[1]);
  } else {
    cleanup = runsView(main);
  }
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

function setupToken() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  const state = document.getElementById("token-state");
  const show = () => {
    state.textContent = getToken() ? "A token is set for this tab." : "No token: calls go unauthenticated.";
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    show();
    route(); // reopen the view's calls and streams with the new credentials
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    setToken("");
    input.value = "";
    show();
    route();
  });
  show();
}

setupToken();
window.addEventListener("hashchange", () => {
  route();
  main.focus({ preventScroll: false }); // a screen reader starts at the new view
});
route();
