// New run: the form is generated from the config schema; the server turns it into YAML, checks it with the CLI's
// own validation, and starts `tunelab train --config FILE` in its own process.
"use strict";

function fieldInput(f) {
  const value = f.value !== undefined ? f.value : f.default;
  const attrs = { "data-key": f.key, id: "f-" + f.key.replace(".", "-") };
  if (f.kind === "bool") return h("input", { ...attrs, type: "checkbox", checked: !!value });
  if (f.kind === "choice") return h("select", attrs, f.choices.map(c => h("option", { value: c, selected: c === value }, c)));
  const text = value === null || value === undefined ? "" : typeof value === "object" ? JSON.stringify(value) : String(value);
  return h("input", { ...attrs, value: text, size: 24, placeholder: f.nullable ? "null" : "" });
}

function formValues(form) {
  const out = {};
  form.querySelectorAll("[data-key]").forEach(el => { out[el.dataset.key] = el.type === "checkbox" ? el.checked : el.value; });
  return out;
}

ROUTES.new = async (main) => {
  const schema = await api("/api/schema");
  const form = h("div", { id: "config-form" });
  schema.sections.forEach(s => form.append(h("details", { class: "form-section", open: s.name !== "quantization" },
    h("summary", {}, s.name), s.fields.map(f => h("div", { class: "field" },
      h("label", { for: "f-" + f.key.replace(".", "-") }, f.key), fieldInput(f), h("span", { class: "help" }, f.help))))));
  const yaml = h("textarea", { id: "yaml", rows: 14 });
  const path = h("input", { id: "config-path", size: 40 });
  const command = h("div", { id: "train-command" });
  const error = h("pre", { id: "config-error", class: "error", hidden: true });
  const start = h("button", { id: "btn-start", class: "primary" }, t("new.start"));
  main.append(h("h1", {}, t("new.title")), await datasetCard(form));
  main.append(h("div", { class: "cols" }, form, h("div", {},
    h("h2", {}, t("new.yaml")), yaml, h("div", { class: "toolbar" }, h("label", {}, t("new.path") + " "), path,
      h("button", { id: "btn-check", onclick: () => render({ yaml: yaml.value }) }, t("new.check")), start),
    error, command)));

  let pathEdited = false;
  path.addEventListener("input", () => { pathEdited = true; });
  async function render(req) {
    const out = await api("/api/config/render", { json: { ...req, config_path: pathEdited ? path.value : null } });
    if (req.values) yaml.value = out.yaml;
    path.value = out.config_path;
    command.replaceChildren(cmdBox(out.command));
    error.hidden = !out.error; error.textContent = out.error || "";
    return out;
  }
  let timer;
  form.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => render({ values: formValues(form) }), 250); });
  form.addEventListener("change", () => { clearTimeout(timer); timer = setTimeout(() => render({ values: formValues(form) }), 50); });
  yaml.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => render({ yaml: yaml.value }), 400); });
  start.addEventListener("click", async () => {
    start.disabled = true;
    try {
      const out = await api("/api/train", { json: { yaml: yaml.value, config_path: path.value } });
      error.hidden = !out.error; error.textContent = out.error || "";
      if (out.job) {
        sessionStorage.setItem("tunelab.job." + out.run, out.job.id);
        toast(out.command);
        location.hash = "#/run/" + encodeURIComponent(out.run || "");
      }
    } catch (e) { toast(e.message, 8000); } finally { start.disabled = false; }
  });
  await render({ values: formValues(form) });
};

async function datasetCard(form) {
  const { datasets: list, accept, notes } = await api("/api/datasets");
  (notes || []).forEach(n => toast(n, 8000));
  const select = h("select", { id: "dataset" }, h("option", { value: "" }, "—"), list.map(d => h("option", { value: d.path }, d.path + (d.kind === "prepared" ? " (prepared)" : ""))));
  const file = h("input", { type: "file", id: "upload", accept: accept.join(",") });
  const tok = h("input", { type: "checkbox", id: "tokstats" });
  const out = h("div", { id: "validate-report" });
  const setTrain = p => {
    const el = form.querySelector('[data-key="data.train"]');
    el.value = p; el.dispatchEvent(new Event("input", { bubbles: true }));
  };
  select.addEventListener("change", () => { if (select.value) setTrain(select.value); });
  file.addEventListener("change", async () => {
    const f = file.files[0]; if (!f) return;
    const res = await api("/api/datasets/upload?name=" + encodeURIComponent(f.name), { method: "PUT", body: f });
    select.append(h("option", { value: res.path, selected: true }, res.path));
    setTrain(res.path); toast(res.path);
  });
  const validate = async () => {
    const path = form.querySelector('[data-key="data.train"]').value;
    const fmt = form.querySelector('[data-key="data.format"]').value;
    const model = tok.checked ? form.querySelector('[data-key="model.name"]').value : null;
    out.replaceChildren(h("p", { class: "muted" }, "…"));
    try {
      const r = await api("/api/datasets/validate", { json: { path, format: fmt, model } });
      out.replaceChildren(cmdBox(r.command), r.error ? h("pre", { class: "error" }, r.error) : "",
        r.report ? kvTable({ records_read: r.report.records_read, records_accepted: r.report.records_accepted,
          records_rejected: r.report.records_rejected, duplicates_removed: r.report.duplicates_removed, usable: r.report.usable }) : "",
        r.report && r.report.rejected_examples.length ? h("table", { id: "validate-rejected" },
          h("tr", {}, ["source", "location", "reason"].map(c => h("th", {}, c))),
          r.report.rejected_examples.map(x => h("tr", {}, h("td", {}, x.source), h("td", {}, x.location), h("td", {}, x.reason)))) : "",
        h("details", {}, h("summary", {}, "output"), h("pre", {}, r.output)));
    } catch (e) { out.replaceChildren(h("p", { class: "error" }, e.message)); }
  };
  return h("div", { class: "card" }, h("h2", {}, t("new.dataset")), h("div", { class: "toolbar" }, select,
    h("label", {}, t("new.upload"), " ", file), h("label", {}, tok, " ", t("new.tokstats")),
    h("button", { id: "btn-validate", onclick: validate }, t("new.validate"))), out);
}
