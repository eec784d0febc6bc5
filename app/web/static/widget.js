/* The chat widget: <script src="https://HOST/widget.js" async></script> on any allowed site adds a launcher
 * button and a chat panel, in a shadow root of their own, that talk to HOST.
 *
 * Who is chatting: the JWT the host page hands over (data-token="..." on the script tag, or
 * window.chatqueue.setToken(jwt) at any time), else a guest token from HOST where guests are allowed.
 * The reply streams in, rendered from Markdown and sanitized (marked and DOMPurify, served by HOST);
 * Stop cancels it; a dropped connection reconnects and resumes after the last piece shown; after a reload
 * the last conversation (and a reply still coming) is shown again.
 */
(() => {
  "use strict";
  const script = document.currentScript;
  const HOST = new URL(script.src).origin;
  const KEY = `chatqueue:${HOST}:`;  // localStorage: guest token, conversation, reply in progress
  const store = {
    get: (k) => localStorage.getItem(KEY + k),
    set: (k, v) => (v === null || v === undefined ? localStorage.removeItem(KEY + k) : localStorage.setItem(KEY + k, v)),
  };
  let token = script.dataset.token || null, siteToken = !!token;
  let ws = null, conversationId = store.get("conversation"), current = null, blocked = false, retryMs = 1000;
  let core = null, render = null;  // chat-core.js, and its Markdown renderer, once loaded
  const bubbles = {};

  // ---- the panel, in a shadow root: the host page's styles do not reach in, ours do not leak out ----
  const host = document.createElement("div");
  host.id = "chatqueue-widget";
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `
<style>
  :host { all: initial; }
  * { box-sizing: border-box; font: 14px/1.45 system-ui, sans-serif; }
  .launcher { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000; width: 56px; height: 56px;
              border-radius: 50%; border: 0; background: #2451d6; color: #fff; font-size: 24px; cursor: pointer;
              box-shadow: 0 4px 14px rgba(0,0,0,.25); }
  .panel { position: fixed; right: 20px; bottom: 88px; z-index: 2147483000; width: 360px; max-width: calc(100vw - 40px);
           height: 520px; max-height: calc(100vh - 120px); display: none; flex-direction: column; background: #fff;
           color: #1d2330; border-radius: 12px; box-shadow: 0 8px 30px rgba(0,0,0,.25); overflow: hidden; }
  .panel.open { display: flex; }
  header { padding: 10px 14px; background: #2451d6; color: #fff; font-weight: 600; display: flex;
           justify-content: space-between; align-items: center; }
  header button { background: none; border: 0; color: #fff; cursor: pointer; font-size: 13px; }
  .log { flex: 1; overflow-y: auto; padding: 12px; }
  .msg { margin: 0 0 10px; padding: 8px 11px; border-radius: 10px; max-width: 92%; overflow-wrap: anywhere; }
  .msg.user { background: #dbe9ff; margin-left: auto; white-space: pre-wrap; }
  .msg.assistant { background: #f0f1f4; }
  .msg.assistant p { margin: 0 0 6px; } .msg.assistant p:last-child { margin: 0; }
  .msg pre { background: #1d2330; color: #f0f1f4; padding: 8px; border-radius: 6px; overflow-x: auto; }
  .msg code { font-family: ui-monospace, monospace; font-size: 13px; }
  .notice { color: #a11; font-size: 13px; padding: 12px; }
  .status { font-size: 12px; color: #7a8090; padding: 0 12px 6px; min-height: 18px; }
  form { display: flex; gap: 6px; padding: 8px; border-top: 1px solid #e2e5ea; }
  textarea { flex: 1; resize: none; height: 40px; padding: 7px; border: 1px solid #cfd4dc; border-radius: 6px; }
  form button { border: 0; border-radius: 6px; padding: 0 10px; background: #2451d6; color: #fff; cursor: pointer; }
  form button[disabled] { background: #aab4c8; cursor: default; }
</style>
<button class="launcher" part="launcher" aria-label="Open the chat">💬</button>
<section class="panel" role="dialog" aria-label="Chat">
  <header><span class="title"></span><button class="new" type="button">New chat</button></header>
  <div class="log" aria-live="polite"></div>
  <div class="status"></div>
  <form><textarea placeholder="Ask something…" aria-label="Message"></textarea>
    <button class="send" type="submit">Send</button><button class="stop" type="button" disabled>Stop</button></form>
</section>`;
  const $ = (sel) => root.querySelector(sel);
  $(".title").textContent = script.dataset.title || "Chat";

  function status(text) { $(".status").textContent = text; }

  function bubble(role, text) {
    const el = document.createElement("div");
    el.className = "msg " + role;
    el.dataset.text = "";
    $(".log").appendChild(el);
    show(el, text);
    return el;
  }

  // Model output is Markdown: rendered, then sanitized, never inserted as it came.
  function show(el, text) {
    el.dataset.text = text;
    if (el.classList.contains("assistant") && render) {
      el.innerHTML = render(text);
    } else {
      el.textContent = text;
    }
    $(".log").scrollTop = $(".log").scrollHeight;
  }

  function notice(text) {
    const el = document.createElement("div");
    el.className = "notice";
    el.textContent = text;
    $(".log").replaceChildren(el);
  }

  function block(text) {  // nothing here will work: say so once, and stop trying
    blocked = true;
    notice(text);
    status("");
    $(".send").disabled = true;
    if (ws) ws.close();
  }

  let coreLoaded = null;
  function loadCore() {
    coreLoaded = coreLoaded || (async () => {
      core = await import(`${HOST}/static/chat-core.js`);
      render = await core.markdownRenderer(HOST);
      outbox = new core.Outbox();
    })();
    return coreLoaded;
  }

  function authHeader() { return { Authorization: "Bearer " + token }; }

  async function guestToken(renew) {
    const kept = store.get("guest");
    if (kept && !renew && !core.expired(kept)) return kept;
    const res = await fetch(`${HOST}/api/guest`, { method: "POST", headers: kept ? { Authorization: "Bearer " + kept } : {} });
    if (!res.ok) return null;
    const fresh = (await res.json()).token;
    store.set("guest", fresh);
    return fresh;
  }

  async function signIn(renew) {
    if (siteToken) return true;
    token = await guestToken(renew);
    return !!token;
  }

  async function start() {
    let config;
    try {
      config = await (await fetch(`${HOST}/api/widget-config`)).json();
    } catch (e) {
      status("cannot reach the chat service; retrying…");
      setTimeout(start, 5000);
      return;
    }
    if (!config.origin_allowed) {
      block(`This site (${location.origin}) is not allowed to use this chat service.`);
      return;
    }
    await loadCore();
    if (!(await signIn(false))) {
      block("Sign in on this site to chat.");
      return;
    }
    await openConversation();
    connect();
  }

  async function openConversation() {
    if (!conversationId) return;
    const res = await fetch(`${HOST}/api/conversations/${conversationId}/messages`, { headers: authHeader() });
    if (!res.ok) {  // gone, or another caller's: start afresh
      conversationId = null;
      store.set("conversation", null);
      return;
    }
    $(".log").replaceChildren();
    for (const m of (await res.json()).messages) {
      if (m.role === "user" || m.role === "assistant") bubble(m.role, m.content);
    }
    // A reply that was still coming when the page went: follow it again from its start, unless it is stored
    // (then the history above ends with it).
    const pending = store.get("pending"), last = $(".log").lastElementChild;
    if (pending && !(last && last.classList.contains("assistant"))) {
      current = { requestId: pending, lastSeq: -1, el: bubble("assistant", "") };
      bubbles[pending] = current.el;
    } else {
      store.set("pending", null);
    }
  }

  function connect() {
    if (blocked) return;
    ws = new WebSocket(`${HOST.replace(/^http/, "ws")}/ws`);
    ws.onopen = () => {
      retryMs = 1000;
      ws.send(JSON.stringify({ type: "auth", token }));  // the token in a frame, never in the URL
      if (current) ws.send(JSON.stringify({ type: "resume", request_id: current.requestId, after_seq: current.lastSeq }));
      status("");
      outbox.flush(ws, conversationId);
    };
    ws.onclose = () => {
      if (blocked) return;
      status("reconnecting…");
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 15000);
    };
    ws.onmessage = (ev) => frame(JSON.parse(ev.data));
  }

  function frame(f) {
    if (f.type === "accepted") {
      conversationId = f.conversation_id;
      store.set("conversation", conversationId);
      store.set("pending", f.request_id);
      current = { requestId: f.request_id, lastSeq: -1, el: bubble("assistant", "") };
      bubbles[f.request_id] = current.el;
      $(".stop").disabled = false;
      status(f.queue_depth ? `queued behind ${f.queue_depth}` : "…");
    } else if (f.type === "token") {
      const el = bubbles[f.request_id];
      if (!current || current.requestId !== f.request_id || f.seq <= current.lastSeq) return;
      current.lastSeq = f.seq;
      if (el) show(el, el.dataset.text + f.text);
    } else if (f.type === "done") {
      const el = bubbles[f.request_id];
      if (el && f.content !== undefined) show(el, f.content);  // answered from storage: the whole reply
      if (el) el.dataset.finish = f.finish_reason;
      if (current && current.requestId === f.request_id) current = null;
      store.set("pending", null);
      $(".stop").disabled = true;
      status(f.finish_reason === "cancelled" ? "stopped" : "");
    } else if (f.type === "error") {
      if (f.code === "unauthorized" && !siteToken) {
        signIn(true).then((ok) => (ok ? ws.close() : block("Sign in on this site to chat.")));
      } else if (f.code === "unavailable" && current && f.request_id === current.requestId) {
        setTimeout(() => {  // its stream broke (the service restarting): resume after what is shown
          if (current && ws.readyState === WebSocket.OPEN)
            ws.send(JSON.stringify({ type: "resume", request_id: current.requestId, after_seq: current.lastSeq }));
        }, 1000);
      } else {
        status(f.code === "busy" || f.code === "rate_limited"
          ? `busy; try again in ${Math.ceil(f.retry_after || 1)} s` : f.message);
      }
    }
  }

  // A message typed before the socket is open (or while it reconnects) is sent once it is.
  let outbox = null;
  $("form").onsubmit = async (e) => {
    e.preventDefault();
    const content = $("textarea").value.trim();
    if (!content || blocked || current) return;
    await loadCore();
    if (!outbox.put(content)) return;
    bubble("user", content);
    $("textarea").value = "";
    if (!ws || ws.readyState !== WebSocket.OPEN) status("connecting…");
    outbox.flush(ws, conversationId);
  };
  $("textarea").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
  };
  $(".stop").onclick = () => { if (current) ws.send(JSON.stringify({ type: "cancel", request_id: current.requestId })); };
  $(".new").onclick = () => {
    conversationId = null;
    store.set("conversation", null);
    if (!blocked) $(".log").replaceChildren();
  };
  let started = false;
  const open = () => {
    $(".panel").classList.add("open");
    if (!started) { started = true; start(); }
    $("textarea").focus();
  };
  $(".launcher").onclick = () => ($(".panel").classList.contains("open") ? $(".panel").classList.remove("open") : open());

  // For the host page: hand over (or renew) its user's token, open or close the panel.
  window.chatqueue = {
    setToken(jwt) {
      token = jwt;
      siteToken = true;
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "auth", token }));
    },
    open,
    close: () => $(".panel").classList.remove("open"),
  };
  (document.body || document.documentElement).appendChild(host);
  if (store.get("conversation") || store.get("pending")) open();  // after a reload: back where the visitor was
})();
