// The screens: runs table, one run (live), compare, new run, chat. Every value shown comes from the API,
// which reads the run folders; every button runs an ordinary `tunelab` command and shows it.
"use strict";

const COLUMNS = [
  ["name"], ["status"], ["model"], ["method"], ["data"], ["steps", "num"], ["best_eval_loss", "num"],
  ["perplexity", "num"], ["bleu", "num"], ["duration", "num"], ["created"],
];

// ---------------------------------------------------------------- runs
ROUTES.runs = async (main) => {
  const state = { sort: localStorage.getItem("tunelab.sort") || "created", desc: true, filter: "", selected: new Set(), rows: [] };
  const filter = h("input", { id: "filter", placeholder: t("runs.filter"), size: 36,
    oninput: e => { state.filter = e.target.value.toLowerCase(); draw(); } });
  const compareBtn = h("button", { id: "compare-btn", class: "primary", disabled: true,
    onclick: () => { location.hash = "#/compare/" + [...state.selected].map(encodeURIComponent).join(","); } }, t("runs.compare"));
  const count = h("span", { class: "muted" });
  const table = h("table", { id: "runs-table" });
  main.append(h("h1", {}, t("runs.title")), h("div", { class: "toolbar" }, filter, compareBtn, count), table);

  const value = (r, key) => key === "duration" ? r.duration_s : r[key];
  function draw() {
    const rows = state.rows.filter(r => !state.filter ||
      [r.name, r.model, r.method, r.data, r.status, t(`status.${r.status}`)].join(" ").toLowerCase().includes(state.filter));
    rows.sort((a, b) => {
      const x = value(a, state.sort), y = value(b, state.sort);
      const c = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return state.desc ? -c : c;
    });
    count.textContent = `${rows.length} / ${state.rows.length} ${t("runs.count")}`;
    const head = h("tr", {}, h("th", {}, ""), COLUMNS.map(([key, cls]) => h("th", { class: cls, "data-col": key,
      onclick: () => { state.desc = state.sort === key ? !state.desc : true; state.sort = key; localStorage.setItem("tunelab.sort", key); draw(); } },
      t(`col.${key}`) + (state.sort === key ? (state.desc ? " ▼" : " ▲") : ""))));
    const body = document.createDocumentFragment();
    rows.forEach(r => {
      const box = h("input", { type: "checkbox", "data-run": r.name, checked: state.selected.has(r.name),
        onchange: e => { e.target.checked ? state.selected.add(r.name) : state.selected.delete(r.name); compareBtn.disabled = state.selected.size < 2; } });
      const steps = r.steps === null || r.steps === undefined ? "" : r.total_steps ? `${r.steps}/${r.total_steps}` : r.steps;
      body.append(h("tr", { "data-run": r.name },
        h("td", {}, box),
        h("td", {}, h("a", { href: "#/run/" + encodeURIComponent(r.name) }, r.name)),
        h("td", { title: r.note || "" }, badge(r.status)),
        h("td", {}, r.model), h("td", {}, r.method), h("td", {}, r.data),
        h("td", { class: "num" }, steps), h("td", { class: "num" }, fmt(r.best_eval_loss)),
        h("td", { class: "num" }, fmt(r.perplexity)), h("td", { class: "num" }, fmt(r.bleu)),
        h("td", { class: "num" }, fmtDuration(r.duration_s)), h("td", {}, (r.created || "").replace("T", " ").slice(0, 16))));
    });
    table.replaceChildren(h("thead", {}, head), h("tbody", {}, body));
    compareBtn.disabled = state.selected.size < 2;
  }
  async function load() {
    state.rows = (await api("/api/runs")).runs;
    draw();
    if (!state.rows.length) table.replaceChildren(h("caption", {}, `${t("runs.none")} ${(await api("/api/info")).runs_dir}`));
  }
  await load();
  const timer = setInterval(() => { if (!document.hidden) load().catch(() => {}); }, 3000);
  onLeave(() => clearInterval(timer));
};

// ---------------------------------------------------------------- one run
const CHARTS = [["loss"], ["lr"], ["grad_norm"], ["tokens_per_s"], ["memory"]];
const MEMORY_KEYS = ["memory_gib", "rss_gib", "peak_memory_gib", "cuda_memory_gib", "gpu_memory_gib"];

function progressOf(records, status) {
  const train = records.filter(r => typeof r.loss === "number" && typeof r.elapsed_s === "number");
  if (!train.length) return null;
  let seg = train.length - 1;  // the current session: elapsed_s restarts when a run is resumed
  while (seg > 0 && train[seg - 1].elapsed_s <= train[seg].elapsed_s) seg--;
  const first = train[seg], last = train[train.length - 1];
  const perStep = last.step > first.step ? (last.elapsed_s - first.elapsed_s) / (last.step - first.step)
    : last.elapsed_s / Math.max(last.step, 1);
  return { step: last.step, perStep, eta: status.total_steps ? perStep * (status.total_steps - last.step) : null };
}

// A run just started from this tab may not have its folder yet: show its command's output until it does.
async function waitForRun(main, name) {
  const visit = page.visit;
  for (;;) {
    try { return await api("/api/run?name=" + encodeURIComponent(name)); } catch (e) {
      const jobId = sessionStorage.getItem("tunelab.job." + name);
      if (!jobId) throw e;
      const job = await api("/api/jobs/" + jobId);
      main.replaceChildren(h("h1", {}, name), h("p", { class: "muted", id: "waiting" }, job.state === "ended"
        ? `exit ${job.returncode}` : "…"), cmdBox(job.command), h("pre", { id: "log" }, job.output));
      if (job.state === "ended") return null;
      await new Promise(r => setTimeout(r, 1000));
      if (page.visit !== visit) return null;
    }
  }
}

ROUTES.run = async (main, name) => {
  const info = await waitForRun(main, name);
  if (!info) return;
  main.textContent = "";
  let records = info.metrics, status = { status: info.status, note: info.note, ...info.manifest };
  const head = h("div", { class: "toolbar" });
  const progress = h("div", { id: "progress" });
  const cmd = h("div", { id: "last-command" });
  const charts = {}, grid = h("div", { class: "grid" });
  CHARTS.forEach(([key]) => {
    const el = h("div", { class: "chart", id: `chart-${key}` });
    grid.append(h("div", { class: "card" }, el));
    charts[key] = key === "loss" ? new LineChart(el, t("chart.loss"), ["loss", "eval_loss"], { dashed: [1] })
      : new LineChart(el, t(`chart.${key}`), [key], { empty: key === "memory" ? t("chart.nomemory") : "" });
  });
  const log = h("pre", { id: "log" }, info.log_tail || "");
  const jobsBox = h("div", { id: "jobs" });
  main.append(h("h1", {}, name, " ", h("span", { id: "run-status" })), head, progress, cmd, grid);

  const act = async (action) => {
    try {
      const out = await api("/api/run/action", { json: { name, action } });
      cmd.replaceChildren(h("h2", {}, t("run.command")), cmdBox(out.command));
      toast(out.command);
    } catch (e) { toast(e.message, 8000); }
  };
  function drawHead() {
    document.getElementById("run-status").replaceChildren(badge(status.status));
    const live = ["running", "starting"].includes(status.status);
    head.replaceChildren(
      h("button", { id: "btn-stop", disabled: !live, onclick: () => act("stop") }, t("run.stop")),
      h("button", { id: "btn-resume", disabled: live || status.status === "finished", onclick: () => act("resume") }, t("run.resume")),
      ...["eval", "merge", "export", "report"].map(a => h("button", { id: `btn-${a}`, disabled: live, onclick: () => act(a) }, t(`run.${a}`))),
      status.note ? h("span", { class: "note" }, status.note) : "");
    const p = progressOf(records, status), total = status.total_steps;
    const step = (p && p.step) || status.global_step || 0;
    progress.replaceChildren(total ? h("span", {}, `${t("run.progress")} `, h("span", { class: "progress" },
      h("div", { style: `width:${Math.min(100, 100 * step / total)}%` })), ` ${t("run.step")} ${step}/${total}`,
      p && p.eta !== null && live ? `  ·  ${t("run.eta")} ${fmtDuration(p.eta)}` : "") : "");
    jobsBox.replaceChildren(...(status.jobs || info.jobs || []).map(j => h("div", {},
      h("span", { class: "muted" }, `${t("common.job")} ${j.id} · ${j.state}${j.returncode !== null && j.returncode !== undefined ? " · exit " + j.returncode : ""} · `),
      h("a", { href: `/api/jobs/${j.id}/log` }, t("common.download")), cmdBox(j.command))));
  }
  function drawCharts() {
    charts.loss.update([pointsOf(records, "loss"), pointsOf(records, "eval_loss")]);
    ["lr", "grad_norm", "tokens_per_s"].forEach(k => charts[k].update([pointsOf(records, k)]));
    const memKey = MEMORY_KEYS.find(k => records.some(r => typeof r[k] === "number"));
    charts.memory.update([memKey ? pointsOf(records, memKey) : []]);
  }
  drawHead(); drawCharts();
  const sections = h("div", { id: "sections" }, ...runSections(info));
  main.append(sections, h("h2", {}, t("run.jobs")), jobsBox, h("h2", {}, t("run.log")), log);
  // data report, evaluations and artefacts appear as the run goes on: re-read them when its status changes
  const refresh = async () => { sections.replaceChildren(...runSections(await api("/api/run?name=" + encodeURIComponent(name)))); };

  const es = new EventSource(`/api/run/events?name=${encodeURIComponent(name)}&offset=${info.metrics_offset}`);
  es.addEventListener("metrics", e => { records = records.concat(JSON.parse(e.data).records); drawCharts(); drawHead(); });
  es.addEventListener("reset", e => { records = JSON.parse(e.data).records; drawCharts(); drawHead(); });
  es.addEventListener("status", e => {
    const next = JSON.parse(e.data), changed = next.status !== status.status || JSON.stringify(next.jobs) !== JSON.stringify(status.jobs);
    status = next; drawHead();
    if (changed) refresh().catch(() => {});
  });
  es.addEventListener("log", e => { log.textContent = JSON.parse(e.data).text; log.scrollTop = log.scrollHeight; });
  onLeave(() => es.close());
};

function kvTable(obj) {
  return h("table", {}, Object.entries(obj || {}).map(([k, v]) => h("tr", {}, h("td", {}, k),
    h("td", {}, typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v)))));
}

function runSections(info) {
  const out = [];
  const sec = (title, ...body) => out.push(h("details", { open: true }, h("summary", {}, title), ...body));
  if (info.manifest_error) out.push(h("p", { class: "error" }, info.manifest_error));
  const d = info.data;
  if (d && d.error) sec(t("run.data"), h("p", { class: "error" }, d.error));
  else if (d) sec(t("run.data"), kvTable({ records_read: d.records_read, records_accepted: d.records_accepted,
      records_rejected: d.records_rejected, duplicates_removed: d.duplicates_removed, usable: d.usable, folder: d.folder }),
    d.rejected.length ? h("div", {}, h("h2", {}, t("run.rejected")), h("table", { id: "rejected" },
      h("tr", {}, ["source", "location", "reason"].map(c => h("th", {}, c))),
      d.rejected.map(r => h("tr", {}, h("td", {}, r.source), h("td", {}, r.location), h("td", {}, r.reason))))) : "");
  else sec(t("run.data"), h("p", { class: "muted" }, t("run.nodata")));
  const ev = info.evals;
  if (ev && ev.error) sec(t("run.evals"), h("p", { class: "error" }, ev.error));
  else if (!ev || !ev.length) sec(t("run.evals"), h("p", { class: "muted" }, t("run.noevals")), kvTable((info.manifest || {}).metrics));
  else sec(t("run.evals"), ...ev.map(e => h("div", {}, h("h2", {}, `eval/${e.name}`),
    h("table", {}, h("tr", {}, h("th", {}, "metric"), h("th", { class: "num" }, "base"), h("th", { class: "num" }, "fine-tuned")),
      Object.entries(e.metrics).map(([k, v]) => h("tr", {}, h("td", {}, k),
        h("td", { class: "num" }, fmt((e.base_metrics || {})[k])), h("td", { class: "num" }, fmt(v))))),
    h("h2", {}, t("run.predictions")), h("table", { class: "predictions" },
      h("tr", {}, ["prompt", "reference", "base", "fine-tuned"].map(c => h("th", {}, c))),
      e.predictions.map(p => h("tr", {}, h("td", {}, p.prompt), h("td", {}, p.reference),
        h("td", {}, p.base_prediction ?? ""), h("td", {}, p.prediction)))))));
  const arts = info.artefacts;
  sec(t("run.artefacts"), arts && arts.error ? h("p", { class: "error" }, arts.error) : h("table", { id: "artefacts" },
    (arts || []).map(a => h("tr", {}, h("td", {}, a.outside || a.path.startsWith("checkpoint-") ? a.path : h("a", {
      href: `/api/run/file?name=${encodeURIComponent(info.name)}&path=${encodeURIComponent(a.path)}` }, a.path)),
      h("td", {}, cmdBox(a.command), a.recorded ? "" : h("span", { class: "muted" }, "(rebuilt from the manifest)"))))));
  sec(t("run.config"), h("pre", { id: "config-yaml" }, info.config_yaml ?? "(no config.yaml)"));
  sec(t("run.manifest"), h("pre", {}, JSON.stringify(info.manifest, null, 2)));
  return out;
}

// ---------------------------------------------------------------- compare
ROUTES.compare = async (main, arg) => {
  const names = arg.split(",").filter(Boolean);
  const c = await api("/api/compare?names=" + names.map(encodeURIComponent).join(","));
  main.append(h("h1", {}, t("cmp.title"), ": ", names.join(" · ")));
  const exportBox = h("div", {});
  main.append(h("div", { class: "toolbar" }, h("button", { id: "btn-export", onclick: async () => {
    const out = await api("/api/compare/export", { json: { names } });
    exportBox.replaceChildren(cmdBox(out.command), h("a", { href: `/api/jobs/${out.job.id}/log`, id: "export-link" }, t("common.download")));
  } }, t("cmp.export"))), exportBox);
  const grid = h("div", { class: "grid" });
  main.append(grid);
  [["loss", "chart.loss"], ["eval_loss", "eval_loss"], ["lr", "chart.lr"]].forEach(([key, title]) => {
    const el = h("div", { class: "chart", id: `cmp-${key}` });
    grid.append(h("div", { class: "card" }, el));
    // eval losses are few points per run (often one, at the end): draw the points, not only lines
    new LineChart(el, t(title), c.labels, { points: key === "eval_loss" }).update(c.curves.map(recs => pointsOf(recs, key)));
  });
  const diff = Object.entries(c.config_diff);
  main.append(h("h2", {}, t("cmp.config")), diff.length ? h("table", { id: "config-diff" },
    h("tr", {}, h("th", {}, "key"), c.labels.map(n => h("th", {}, n))),
    diff.map(([k, vs]) => h("tr", {}, h("td", {}, k), vs.map(v => h("td", {}, typeof v === "string" ? v : JSON.stringify(v))))))
    : h("p", { class: "muted" }, t("cmp.same")));
  main.append(h("h2", {}, t("cmp.metrics")), h("table", { id: "metrics-table" },
    h("tr", {}, h("th", {}, "metric"), c.labels.map(n => h("th", { class: "num" }, n))),
    Object.entries(c.metrics).map(([k, vs]) => h("tr", {}, h("td", {}, k), vs.map((v, i) =>
      h("td", { class: "num" + ((c.best[k] || []).includes(i) ? " best" : "") }, (c.best[k] || []).includes(i) ? "★ " + fmt(v) : fmt(v)))))));
  main.append(h("h2", {}, t("cmp.data")), kvTable(Object.fromEntries(Object.entries(c.data).map(([k, v]) => [k, v.join(" | ")]))));
};
