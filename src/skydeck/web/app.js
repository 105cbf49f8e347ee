// skydeck web UI: plain ES module, no build step, no external resources.
// Screens (hash routes): #/agents, #/agents/new, #/agents/<name>/edit,
// #/chat/<channel>, #/jobs. The token (if the daemon needs one) lives in
// sessionStorage and goes out as a bearer header, also for the live stream,
// which is read with fetch() so the token never appears in a URL or a log.

const view = document.getElementById("view");
const TOKEN_KEY = "skydeck.token";
let cleanup = () => {};

class ApiError extends Error {
  constructor(message, status, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(method, path, body) {
  for (let tries = 0; ; tries++) {
    const response = await fetch(path, {
      method,
      headers: { ...authHeaders(), ...(body === undefined ? {} : { "Content-Type": "application/json" }) },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401 && tries < 3) {
      await askToken(tries > 0);
      continue;
    }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new ApiError(data.error || `HTTP ${response.status}`, response.status, data.field);
    return data;
  }
}

function askToken(wrong) {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-error").textContent = wrong ? "That token was not accepted." : "";
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      resolve();
    }, { once: true });
    if (!dialog.open) dialog.showModal();
    input.focus();
  });
}

// Turn events over SSE, read with fetch so the bearer header can be sent.
function subscribe(channel, onEvent) {
  const controller = new AbortController();
  let stopped = false;
  (async () => {
    let delay = 500;
    while (!stopped) {
      try {
        const response = await fetch(`/api/channels/${encodeURIComponent(channel)}/turn-events`, {
          headers: authHeaders(), signal: controller.signal,
        });
        if (response.status === 401) { await askToken(false); continue; }
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        delay = 500;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const chunk = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = chunk.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
            if (data) onEvent(JSON.parse(data));
          }
        }
      } catch (error) {
        if (stopped) return;
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => { stopped = true; controller.abort(); };
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function show(...nodes) {
  view.replaceChildren(...nodes);
}

function problem(error) {
  return el("p", { class: "form-error", role: "alert" }, error.message || String(error));
}

// -- agents --------------------------------------------------------------------

function badge(status, queued) {
  const text = status === "queued" ? `queued ${queued}` : status;
  return el("span", { class: `badge ${status}`, "data-status": status }, text);
}

async function agentsScreen() {
  const { agents } = await api("GET", "/api/agents");
  const list = el("ul", { class: "cards", "aria-label": "Agents" },
    agents.map((agent) => el("li", { class: "card", "data-agent": agent.name },
      el("div", {},
        el("strong", {}, agent.name), " ",
        badge(agent.status, agent.queued),
        el("div", { class: "meta" }, `channel ${agent.channel} · ${agent.backend} · ${agent.mode}`)),
      el("div", { class: "row" },
        el("a", { class: "button", href: `#/chat/${encodeURIComponent(agent.channel)}` }, "Chat"),
        el("a", { class: "button secondary", href: `#/agents/${encodeURIComponent(agent.name)}/edit` }, "Edit")))));
  show(
    el("h1", {}, "Agents", el("a", { class: "button", href: "#/agents/new" }, "New agent")),
    agents.length ? list : el("p", { class: "empty" }, "No agents yet."),
  );
  const timer = setInterval(async () => {
    try {
      const health = await fetch("/health").then((r) => r.json());
      for (const agent of health.agents || []) {
        const card = view.querySelector(`[data-agent="${CSS.escape(agent.name)}"] .badge`);
        if (card) card.replaceWith(badge(agent.status, agent.queued));
      }
    } catch { /* the next tick tries again */ }
  }, 2000);
  return () => clearInterval(timer);
}

function splitArgs(text) {
  const args = [];
  const pattern = /"([^"]*)"|'([^']*)'|(\S+)/g;
  let match;
  while ((match = pattern.exec(text))) args.push(match[1] ?? match[2] ?? match[3]);
  return args;
}

function field(id, label, control, hint) {
  return el("div", { class: "field" },
    el("label", { for: id }, label), control,
    hint ? el("p", { class: "hint", id: `${id}-hint` }, hint) : null,
    el("p", { class: "field-error", id: `${id}-error`, role: "alert" }));
}

function select(id, options, value) {
  return el("select", { id, name: id }, options.map((o) => el("option", { value: o, selected: o === value }, o)));
}

async function agentForm(name) {
  const agent = name ? await api("GET", `/api/agents/${encodeURIComponent(name)}`) : {};
  const form = el("form", { class: "agent", novalidate: true },
    field("name", "Name", el("input", { id: "name", name: "name", value: agent.name ?? "", readonly: name ? true : undefined, autocomplete: "off" })),
    field("channel", "Channel", el("input", { id: "channel", name: "channel", value: agent.channel ?? "", autocomplete: "off" })),
    field("backend", "Backend", select("backend", ["claude", "command", "echo"], agent.backend ?? "claude")),
    field("mode", "Mode", select("mode", ["single-threaded", "multi-threaded"], agent.mode ?? "single-threaded")),
    field("queue_mode", "Queue mode", select("queue_mode", ["followup", "collect", "interrupt"], agent.queue_mode ?? "followup")),
    field("command", "Command", el("input", { id: "command", name: "command", value: (agent.command ?? []).join(" "), autocomplete: "off" }), "For the command backend: the program and its arguments; the prompt arrives on stdin."),
    field("model", "Model", el("input", { id: "model", name: "model", value: agent.model ?? "" })),
    field("system_prompt", "System prompt", el("textarea", { id: "system_prompt", name: "system_prompt", rows: 3 }, agent.system_prompt ?? "")),
    field("timeout_s", "Turn timeout (seconds)", el("input", { id: "timeout_s", name: "timeout_s", inputmode: "numeric", value: agent.timeout_s ?? 900 })),
    field("max_reply_bytes", "Reply cap (bytes)", el("input", { id: "max_reply_bytes", name: "max_reply_bytes", inputmode: "numeric", value: agent.max_reply_bytes ?? 1048576 }), "Longer replies are cut, with a note saying where."),
    el("p", { class: "form-error", id: "form-error", role: "alert" }),
    el("div", { class: "row" },
      el("button", { type: "submit" }, name ? "Save" : "Create agent"),
      name ? el("button", { type: "button", class: "secondary", onclick: () => resetSession(name) }, "Reset session") : null,
      name ? el("button", { type: "button", class: "danger", onclick: () => removeAgent(name) }, "Delete") : null,
      el("a", { href: "#/agents" }, "Cancel")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    for (const node of form.querySelectorAll(".field-error, .form-error")) node.textContent = "";
    for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
    const data = new FormData(form);
    const body = {
      channel: data.get("channel"), backend: data.get("backend"), mode: data.get("mode"),
      queue_mode: data.get("queue_mode"),
    };
    if (!name) body.name = data.get("name");
    const command = String(data.get("command") || "").trim();
    if (command) body.command = splitArgs(command);
    const timeout = String(data.get("timeout_s") || "").trim();
    body.timeout_s = /^\d+$/.test(timeout) ? Number(timeout) : timeout;
    const cap = String(data.get("max_reply_bytes") || "").trim();
    body.max_reply_bytes = /^\d+$/.test(cap) ? Number(cap) : cap;
    body.model = String(data.get("model") || "").trim() || null;
    body.system_prompt = String(data.get("system_prompt") || "") || null;
    try {
      const saved = await api(name ? "PATCH" : "POST", name ? `/api/agents/${encodeURIComponent(name)}` : "/api/agents", body);
      location.hash = `#/chat/${encodeURIComponent(saved.channel)}`;
    } catch (error) {
      const input = error.field && form.querySelector(`#${CSS.escape(error.field)}`);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        form.querySelector(`#${CSS.escape(error.field)}-error`).textContent = error.message;
        input.focus();
      } else {
        form.querySelector("#form-error").textContent = error.message;
      }
    }
  });
  show(el("h1", {}, name ? `Edit ${name}` : "New agent"), form);
  form.querySelector(name ? "#channel" : "#name").focus();
}

async function resetSession(name) {
  await api("POST", `/api/agents/${encodeURIComponent(name)}/reset`);
  const note = view.querySelector("#form-error, #chat-note");
  if (note) note.textContent = "Session reset: the next turn starts a fresh conversation.";
}

async function removeAgent(name) {
  if (!confirm(`Delete agent ${name}? Its messages are kept.`)) return;
  await api("DELETE", `/api/agents/${encodeURIComponent(name)}`);
  location.hash = "#/agents";
}

// -- chat ----------------------------------------------------------------------

function bubble(message) {
  const node = el("div", { class: `bubble ${message.direction}`, "data-id": message.id },
    message.content, el("span", { class: "when" }, new Date(message.created_at).toLocaleString()));
  // A failure reply (R16) is an outbound message like any other; show it as an error.
  if (message.direction === "out" && message.content.startsWith("⚠️ I couldn't complete that")) {
    node.classList.add("error");
  }
  return node;
}

async function chatScreen(channel) {
  const agents = (await api("GET", "/api/agents")).agents;
  const agent = agents.find((a) => a.channel === channel);
  const log = el("div", { class: "log", role: "log", "aria-label": `Messages in ${channel}`, tabindex: "0" });
  const older = el("button", { type: "button", class: "secondary", id: "older" }, "Load earlier messages");
  const input = el("textarea", { id: "composer", name: "content", rows: 2, placeholder: `Message ${channel}` });
  const send = el("button", { type: "submit" }, "Send");
  const composer = el("form", { class: "composer" },
    el("label", { for: "composer", class: "visually-hidden" }, "Message"),
    input, send);
  const pending = new Map(); // message id -> the reply bubble being streamed
  const finished = new Set(); // message ids whose turn already ended
  let prev = null;

  function stickToBottom(fn) {
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    fn();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function replyBubble(id) {
    let node = pending.get(id);
    if (!node) {
      node = el("div", { class: "bubble out pending", "data-reply-to": id, "aria-busy": "true" }, "…");
      node.dataset.text = "";
      pending.set(id, node);
      stickToBottom(() => log.append(node));
    }
    return node;
  }

  const page = await api("GET", `/api/channels/${encodeURIComponent(channel)}/messages?tail=true&limit=50`);
  prev = page.prev;
  log.append(...page.messages.map(bubble));
  older.hidden = !prev;
  older.addEventListener("click", async () => {
    older.disabled = true;
    const earlier = await api("GET", `/api/channels/${encodeURIComponent(channel)}/messages?before=${prev}&limit=100`);
    const height = log.scrollHeight;
    log.prepend(...earlier.messages.map(bubble));
    log.scrollTop += log.scrollHeight - height;
    prev = earlier.prev;
    older.hidden = !prev;
    older.disabled = false;
  });

  const stop = subscribe(channel, (event) => {
    if (event.kind === "queued" || event.kind === "init") {
      if (!log.querySelector(`[data-id="${CSS.escape(event.message_id)}"]`) && !pending.has(event.message_id)) {
        // Posted from elsewhere (the CLI, a webhook): show the message too.
        replyBubble(event.message_id).before(el("div", { class: "bubble in", "data-id": event.message_id }, "…"));
        api("GET", `/api/messages/${encodeURIComponent(event.message_id)}`).then((message) => {
          const node = log.querySelector(`.bubble.in[data-id="${CSS.escape(message.id)}"]`);
          if (node && node.textContent === "…") node.replaceWith(bubble(message));
        }).catch(() => {});
      }
      replyBubble(event.message_id);
      return;
    }
    if (event.kind === "text") {
      const node = replyBubble(event.message_id);
      node.dataset.text += event.text;
      stickToBottom(() => { node.textContent = node.dataset.text; });
      return;
    }
    if (event.kind === "notify") {
      // An agent's progress message (its MCP notify tool): an agent bubble, placed
      // before the reply still being written, if its turn is running.
      if (log.querySelector(`[data-id="${CSS.escape(event.id)}"]`)) return;
      const note = bubble({ id: event.id, direction: "out", content: event.content, created_at: new Date().toISOString() });
      const waiting = pending.get(event.message_id);
      stickToBottom(() => (waiting ? waiting.before(note) : log.append(note)));
      return;
    }
    if (event.kind === "tool") {
      const node = replyBubble(event.message_id);
      stickToBottom(() => node.before(el("div", { class: "tool" }, `Tool: ${event.name} ${JSON.stringify(event.input)}`)));
      return;
    }
    const node = replyBubble(event.message_id);
    node.classList.remove("pending");
    node.removeAttribute("aria-busy");
    if (event.kind === "done") {
      if (event.reply) node.textContent = event.reply; else node.remove();
    } else {
      node.classList.add("error");
      node.textContent = `The turn failed: ${event.error}`;
    }
    pending.delete(event.message_id);
    finished.add(event.message_id);
  });

  composer.addEventListener("submit", async (event) => {
    event.preventDefault();
    const content = input.value.trim();
    if (!content) return;
    send.disabled = true;
    try {
      const ack = await api("POST", `/api/channels/${encodeURIComponent(channel)}/messages`, { content });
      const mine = bubble({ id: ack.id, direction: "in", content, state: ack.state, created_at: new Date().toISOString() });
      // The live stream may have announced it first: replace that placeholder.
      const announced = log.querySelector(`.bubble.in[data-id="${CSS.escape(ack.id)}"]`);
      if (announced) announced.replaceWith(mine); else stickToBottom(() => log.append(mine));
      if (ack.state === "buffered") document.getElementById("chat-note").textContent = "No agent serves this channel yet: the message is kept until one does.";
      else if (!finished.has(ack.id)) replyBubble(ack.id);
      input.value = "";
    } catch (error) {
      document.getElementById("chat-note").textContent = error.message;
    } finally {
      send.disabled = false;
      input.focus();
    }
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); composer.requestSubmit(); }
  });

  show(el("section", { class: "chat" },
    el("h1", {}, `#${channel}`,
      agent ? badge(agent.status, agent.queued) : el("span", { class: "badge queued" }, "no agent"),
      agent ? el("button", { type: "button", class: "secondary", onclick: () => resetSession(agent.name) }, "Reset session") : null),
    el("div", {}, older, log, el("p", { id: "chat-note", class: "hint", role: "status" })),
    composer));
  log.scrollTop = log.scrollHeight;
  input.focus();
  return stop;
}

// -- jobs ----------------------------------------------------------------------

async function jobsScreen() {
  const { jobs } = await api("GET", "/api/jobs");
  const note = el("p", { id: "jobs-note", class: "hint", role: "status" });
  const rows = jobs.map((job) => el("tr", { "data-job": job.name },
    el("td", {}, el("strong", {}, job.name), job.enabled ? "" : " (disabled)"),
    el("td", {}, el("a", { href: `#/chat/${encodeURIComponent(job.channel)}` }, job.channel)),
    el("td", {}, el("code", {}, job.schedule), " ", job.timezone),
    el("td", {}, job.next_run_at ? new Date(job.next_run_at).toLocaleString() : "—"),
    el("td", {}, job.last_outcome ?? "never ran"),
    el("td", { class: "row" },
      el("button", { type: "button", onclick: async () => {
        const ack = await api("POST", `/api/jobs/${encodeURIComponent(job.name)}/run`);
        note.textContent = `${job.name}: posted (${ack.state}).`;
      } }, "Run now"),
      el("button", { type: "button", class: "danger", onclick: async () => {
        if (!confirm(`Delete job ${job.name}?`)) return;
        await api("DELETE", `/api/jobs/${encodeURIComponent(job.name)}`);
        route();
      } }, "Delete"))));
  show(
    el("h1", {}, "Jobs"),
    jobs.length
      ? el("table", {}, el("thead", {}, el("tr", {}, ["Job", "Channel", "Schedule", "Next run", "Last outcome", ""].map((h) => el("th", { scope: "col" }, h)))), el("tbody", {}, rows))
      : el("p", { class: "empty" }, "No jobs. Add one with `skydeck job add` or POST /api/jobs."),
    note);
}

// -- routing -------------------------------------------------------------------

async function route() {
  cleanup();
  cleanup = () => {};
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    let stop;
    if (parts[0] === "chat" && parts[1]) stop = await chatScreen(parts[1]);
    else if (parts[0] === "agents" && parts[1] === "new") stop = await agentForm(null);
    else if (parts[0] === "agents" && parts[1] && parts[2] === "edit") stop = await agentForm(parts[1]);
    else if (parts[0] === "jobs") stop = await jobsScreen();
    else stop = await agentsScreen();
    if (typeof stop === "function") cleanup = stop;
  } catch (error) {
    show(el("h1", {}, "Something went wrong"), problem(error));
  }
}

window.addEventListener("hashchange", route);
route();
