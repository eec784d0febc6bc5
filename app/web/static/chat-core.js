// What the chat page and the widget share, as an ES module: Markdown rendering (sanitized), the token's
// expiry, and the message typed before the socket is open.

// The model's Markdown rendered by marked, then sanitized by DOMPurify: never inserted as it came.
export async function markdownRenderer(base) {
  const [marked, purify] = await Promise.all([import(`${base}/static/vendor/marked.esm.js`),
                                              import(`${base}/static/vendor/purify.es.mjs`)]);
  marked.marked.setOptions({ gfm: true, breaks: true });
  return (text) => purify.default.sanitize(marked.marked.parse(text));
}

// Whether a JWT expires within a minute (or cannot be read).
export function expired(jwt) {
  try {
    const claims = JSON.parse(atob(jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    return claims.exp * 1000 < Date.now() + 60000;
  } catch (e) { return true; }
}

// One `chat` waiting for an open socket: typed before it opened, or while it reconnects.
export class Outbox {
  constructor() { this.waiting = null; }

  put(content) {
    if (this.waiting) return false;
    this.waiting = { content, clientId: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) };
    return true;
  }

  flush(ws, conversationId) {
    if (!this.waiting || !ws || ws.readyState !== WebSocket.OPEN) return;
    ws.send(JSON.stringify({ type: "chat", content: this.waiting.content, conversation_id: conversationId,
                             client_id: this.waiting.clientId }));
    this.waiting = null;
  }
}
