// Core of the front end: API calls, routing by URL hash, small DOM helpers. Pages live in pages.js.
"use strict";

async function api(path, opts = {}) {
  const init = { ...opts, headers: { ...(opts.headers || {}) } };
  if (opts.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(opts.json);
    init.headers["Content-Type"] = "application/json";
  }
  if (init.method && init.method !== "GET") init.headers["X-Tunelab"] = "1";  // the server refuses writes without it
  const res = await fetch(path, init);
  const body = (res.headers.get("content-type") || "").includes("json") ? await res.json() : await res.text();
  if (!res.ok) throw new Error((body && body.error) || (body && body.detail && JSON.stringify(body.detail)) || res.statusText);
  return body;
}

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  children.flat().forEach(c => el.append(c instanceof Node ? c : document.createTextNode(String(c ?? ""))));
  return el;
}
function fmt(v) {
  if (v === null || v === undefined || v === "") return "";
  if (typeof v === "number") return Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : String(+v.toPrecision(4));
  return String(v);
}
function fmtDuration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`;
  return s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}
function badge(status) { return h("span", { class: `badge s-${status}`, "data-status": status }, t(`status.${status}`)); }
function toast(text, ms = 4000) {
  const el = document.getElementById("toast");
  el.textContent = text; el.hidden = false;
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { el.hidden = true; }, ms);
}
// One command per line, each shown as typed at a prompt.
function cmdBox(command) { return h("code", { class: "cmd" }, String(command).split("\n").map(c => "$ " + c).join("\n")); }

// Streams opened by a page are closed when the page changes (the server keeps nothing per tab).
const page = { cleanups: [], visit: 0 };
function onLeave(fn) { page.cleanups.push(fn); }

const ROUTES = {};
function route() {
  page.visit++;
  page.cleanups.splice(0).forEach(fn => { try { fn(); } catch (e) { /* already closed */ } });
  const [, name = "runs", ...rest] = (location.hash || "#/runs").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.getAttribute("href") === `#/${name}`));
  const main = document.getElementById("main");
  main.textContent = "";
  (ROUTES[name] || ROUTES.runs)(main, arg).catch(e => main.append(h("p", { class: "error" }, e.message)));
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  const sel = document.getElementById("lang");
  sel.value = LANG;
  sel.addEventListener("change", () => { LANG = sel.value; localStorage.setItem("tunelab.lang", LANG); applyStaticText(); route(); });
  applyStaticText();
  route();
});
