// The chat page: submit a message, then follow its events (Server-Sent Events) and show them as they come:
// the sentiment badge on `classified`, the reply growing on `token`, the stored reply on `done`.
"use strict";

// crypto.randomUUID exists only on https and localhost; getRandomValues everywhere (a LAN host over http).
function newId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

const conversationId = sessionStorage.getItem("allinone-conversation") || `web-${newId()}`;
sessionStorage.setItem("allinone-conversation", conversationId);
document.getElementById("conversation").textContent = conversationId;

const log = document.getElementById("log");
const form = document.getElementById("send");
const input = document.getElementById("text");
const button = document.getElementById("submit");
const error = document.getElementById("error");

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

function addTurn(text) {
  const turn = element("div", "turn");
  const meta = element("div", "meta");
  const badge = element("span", "badge", "…");
  badge.title = "sentiment";
  meta.append(badge);
  const bot = element("div", "bot writing");
  turn.append(element("div", "bubble user", text), meta, bot);
  bot.classList.add("bubble");
  log.append(turn);
  turn.scrollIntoView({ block: "end" });
  return { turn, badge, bot };
}

function follow(messageId, view, after = "0", reply = "") {
  // EventSource reconnects by itself after a dropped connection and sends Last-Event-ID: the server resumes after
  // it. An error answer (503 while Redis is away) closes it for good: then follow again, after the last event seen.
  const url = `/messages/${encodeURIComponent(messageId)}/events?after=${encodeURIComponent(after)}`;
  const source = new EventSource(url);
  let last = after;
  const data = (e) => { last = e.lastEventId || last; return JSON.parse(e.data); };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && !view.turn.dataset.status) {
      setTimeout(() => follow(messageId, view, last, reply), 1000);
    }
  };
  source.addEventListener("queued", (e) => { data(e); view.badge.textContent = "queued"; });
  source.addEventListener("classified", (e) => {
    const s = data(e);
    view.badge.textContent = `${s.label} ${Math.round(s.confidence * 100)}%`;
    view.badge.className = `badge ${s.label}`;
    view.turn.dataset.sentiment = s.label;
  });
  source.addEventListener("token", (e) => {
    reply += data(e).text;
    view.bot.textContent = reply.trimStart();
    view.turn.scrollIntoView({ block: "end" });
  });
  source.addEventListener("restart", (e) => { data(e); reply = ""; view.bot.textContent = ""; });
  source.addEventListener("done", (e) => {
    source.close();
    view.bot.textContent = data(e).reply || "(empty reply)";
    view.bot.classList.remove("writing");
    view.turn.dataset.status = "done";
  });
  source.addEventListener("failed", (e) => {
    source.close();
    view.bot.textContent = `failed: ${data(e).reason}`;
    view.bot.classList.remove("writing");
    view.bot.classList.add("failed");
    view.turn.dataset.status = "failed";
  });
}

async function send(text) {
  const response = await fetch(`/conversations/${encodeURIComponent(conversationId)}/messages`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text, message_id: newId() }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `HTTP ${response.status}`);
  return body.message_id;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = input.value;
  if (!text.trim()) return;
  error.textContent = "";
  button.disabled = true;
  try {
    const messageId = await send(text);
    input.value = "";
    const view = addTurn(text);
    view.turn.dataset.messageId = messageId;
    follow(messageId, view);
  } catch (err) {
    error.textContent = err.message;
  } finally {
    button.disabled = false;
    input.focus();
  }
});

input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); form.requestSubmit(); }
});
