// Chat: the same question to the base model and the fine-tuned one, both answers streamed side by side.
"use strict";

ROUTES.chat = async (main, arg) => {
  const targets = (await api("/api/chat/targets")).targets;
  const target = h("select", { id: "chat-target" }, targets.map(x => h("option", { value: x, selected: x === arg }, x)));
  const system = h("input", { id: "chat-system", placeholder: t("chat.system"), size: 40 });
  const maxTok = h("input", { id: "chat-max", type: "number", value: 64, min: 1, max: 2048, style: "width:6em" });
  const prompt = h("textarea", { id: "chat-prompt", rows: 2, placeholder: t("chat.prompt") });
  const cols = { base: h("div", { id: "chat-base" }), tuned: h("div", { id: "chat-tuned" }) };
  const status = h("span", { class: "muted", id: "chat-status" });
  let history = { base: [], tuned: [] };
  const send = h("button", { id: "chat-send", class: "primary" }, t("chat.send"));
  main.append(h("h1", {}, t("chat.title")), h("div", { class: "toolbar" }, h("label", {}, t("chat.target"), " ", target), system,
    h("label", {}, t("chat.max"), " ", maxTok), h("button", { onclick: () => { history = { base: [], tuned: [] }; cols.base.textContent = cols.tuned.textContent = ""; } }, t("chat.reset"))),
    prompt, h("div", { class: "toolbar" }, send, status),
    h("div", { class: "cols" }, h("div", {}, h("h2", {}, t("chat.base")), cols.base), h("div", {}, h("h2", {}, t("chat.tuned")), cols.tuned)));

  const controller = new AbortController();
  onLeave(() => controller.abort());
  send.addEventListener("click", async () => {
    const text = prompt.value.trim();
    if (!text || !target.value) return;
    send.disabled = true; status.textContent = t("chat.loading");
    const bubbles = {};
    for (const side of ["base", "tuned"]) {
      cols[side].append(h("div", { class: "bubble user" }, text));
      bubbles[side] = h("div", { class: "bubble", "data-side": side });
      cols[side].append(bubbles[side]);
    }
    try {
      const res = await fetch("/api/chat", { method: "POST", signal: controller.signal,
        headers: { "Content-Type": "application/json", "X-Tunelab": "1" },
        body: JSON.stringify({ target: target.value, prompt: text, system: system.value || null, history, max_new_tokens: +maxTok.value }) });
      if (!res.ok) throw new Error((await res.json()).error || res.statusText);
      await readEvents(res, (event, data) => {
        if (event === "piece") bubbles[data.side].textContent += data.text;
        else if (event === "error") { (data.side === "both" ? Object.values(bubbles) : [bubbles[data.side]]).forEach(b => { b.classList.add("error"); b.textContent += data.text; }); }
        else if (event === "status") status.textContent = data.text === "loading" ? t("chat.loading") : (data.base_model ? `base: ${data.base_model}` : "");
        else if (event === "done") bubbles[data.side].dataset.done = data.text;
      });
      for (const side of ["base", "tuned"]) history[side].push({ role: "user", content: text }, { role: "assistant", content: bubbles[side].textContent });
      prompt.value = "";
    } catch (e) { if (e.name !== "AbortError") toast(e.message, 8000); } finally { send.disabled = false; }
  });
};

// Server-sent events from a fetch() body (EventSource cannot POST).
async function readEvents(res, onEvent) {
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      const event = (block.match(/^event: (.*)$/m) || [])[1];
      const data = (block.match(/^data: (.*)$/m) || [])[1];
      if (event && data) onEvent(event, JSON.parse(data));
    }
  }
}
