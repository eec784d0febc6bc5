"""What a worker does for one chat request, outside Celery: prompt, stream, store."""

from __future__ import annotations

import logging

from app.protocol import done_frame, token_frame
from app.storage import Store
from app.streams import StreamPublisher
from workers.engine import Engine, GenerationParams
from workers.prompt import build_prompt_ids

logger = logging.getLogger(__name__)


class RequestHandler:
    """Turns a request id into a streamed and stored assistant reply."""

    def __init__(self, store: Store, publisher: StreamPublisher, engine: Engine, system_prompt: str,
                 default_max_new_tokens: int):
        self.store = store
        self.publisher = publisher
        self.engine = engine
        self.system_prompt = system_prompt
        self.default_max_new_tokens = default_max_new_tokens

    def handle(self, request_id: str) -> str:
        """Serve the request once; a repeat (redelivery) finishes what is missing. Returns the finish reason."""
        req = self.store.prompt_request(request_id)
        if req is None:
            # Its conversation was deleted while it waited: nothing to answer.
            logger.info("Request %s has no conversation any more; dropped", request_id)
            self.publisher.publish(request_id, done_frame(request_id, None, "cancelled", 0, 0))
            return "cancelled"

        earlier = self.publisher.events(request_id)
        stored = self.store.reply_for(request_id)
        if stored is not None:
            # Stored before a crash, but perhaps not announced: announce it once.
            if not any(e["type"] == "done" for e in earlier):
                self.publisher.publish(request_id, done_frame(request_id, stored.id, stored.finish_reason,
                                                              stored.prompt_tokens or 0,
                                                              stored.completion_tokens or 0))
            return stored.finish_reason or "stop"

        # A redelivered request continues after the tokens already streamed, so
        # the joined token texts still equal the stored reply.
        prefix = "".join(e["text"] for e in earlier if e["type"] == "token")
        seq = sum(1 for e in earlier if e["type"] == "token")
        tokenizer = self.engine.loaded.tokenizer
        params = req.params
        max_new = int(params.get("max_new_tokens") or self.default_max_new_tokens)
        prefix_ids = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        max_prompt = self.engine.loaded.context_len - max_new
        prompt_ids = build_prompt_ids(tokenizer, self.system_prompt, req.history, max_prompt - len(prefix_ids))
        pieces = [prefix] if prefix else []

        def on_text(text: str) -> None:
            nonlocal seq
            self.publisher.publish(request_id, token_frame(request_id, seq, text))
            pieces.append(text)
            seq += 1

        gen = GenerationParams(max_new_tokens=max(1, max_new - len(prefix_ids)),
                               temperature=float(params.get("temperature") or 0.0))
        try:
            result = self.engine.generate(prompt_ids + prefix_ids, gen, on_text,
                                          lambda: self.publisher.is_cancelled(request_id))
            finish, prompt_tokens, completion = (result.finish_reason, len(prompt_ids),
                                                 len(prefix_ids) + result.completion_tokens)
        except Exception:
            logger.exception("Generation failed for request %s", request_id)
            finish, prompt_tokens, completion = "error", len(prompt_ids), 0

        message_id = self.store.store_reply(request_id, req.conversation_id, "".join(pieces), finish,
                                            prompt_tokens, completion)
        self.publisher.publish(request_id, done_frame(request_id, message_id, finish, prompt_tokens, completion))
        return finish
