"""What a worker does for one chat request, outside Celery: prompt, stream, store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import OperationalError

from app.protocol import SamplingParams, done_frame, token_frame
from app.storage import Store
from workers import metrics
from workers.affinity import Affinity
from workers.metrics import Timing
from workers.prompt import build_prompt_ids
from workers.relay import CancelWatcher, FinishedReplies, TokenRelay

logger = logging.getLogger(__name__)

FIRST_TOKEN_WAIT_S = 0.05  # at most this long: Redis away must not stall the engine
HAND_BACK_SYNC_S = 30  # how long a request handed back waits for its streamed frames to be in Redis


class HandedBack(Exception):
    """The worker is stopping: the request goes back to the queue, to go on elsewhere after what was streamed."""


class RequestHandler:
    """Turns a request id into a streamed and stored assistant reply.

    Many handlers run at once (one per Celery task thread); they share one engine.
    """

    def __init__(self, store: Store, events: Callable[[str], list[dict]], relay: TokenRelay,
                 cancels: CancelWatcher, finished: FinishedReplies, engine, tokenizer, system_prompt: str,
                 metrics_model: str | None = None, affinity: Affinity | None = None):
        self.store = store
        self.events = events
        self.relay = relay
        self.finished = finished
        self.cancels = cancels
        self.engine = engine
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.affinity = affinity  # where this worker says which conversations it served; None: nowhere
        self.metrics_model = metrics_model  # the label of this worker's metrics; None: no metrics
        # Looked up once: one is observed per piece of text, on the engine's thread.
        self._itl = metrics.ITL.labels(metrics_model) if metrics_model else None
        self._in_flight = metrics.IN_FLIGHT.labels(metrics_model) if metrics_model else None
        self._handing_back = threading.Event()

    def hand_back_all(self) -> None:
        """Stop every request in flight and hand each back (:class:`HandedBack`), nothing stored: the worker is
        stopping and its drain time is over. Requests that come later are handed back at once."""
        self._handing_back.set()
        self.cancels.stop_all()

    def handle(self, request_id: str, repeat: bool = True) -> str:
        """Serve the request once; a repeat (redelivery, retry) finishes what is missing. Returns the finish reason.

        ``repeat=False`` says that no worker has taken this request before, so
        its stream is still empty: reading it is skipped, a round trip less
        before the first token.
        """
        if self.affinity is not None:
            self.affinity.took()
        try:
            return self._handle(request_id, repeat)
        finally:
            if self.affinity is not None:
                self.affinity.ended()

    def _handle(self, request_id: str, repeat: bool) -> str:
        if self._handing_back.is_set():
            raise HandedBack(request_id)
        req = self.store.prompt_request(request_id)
        if req is not None and self.affinity is not None:
            self.affinity.serves(req.conversation_id)  # before any reply: the next turn may come at once
        if req is None:
            # Its conversation was deleted while it waited: nothing to answer.
            logger.info("Request %s has no conversation any more; dropped", request_id)
            self.relay.send(request_id, done_frame(request_id, None, "cancelled", 0, 0), wait=True)
            return "cancelled"

        stored = req.reply
        earlier = self.events(request_id) if repeat or stored is not None else []
        if stored is not None:
            # Stored before a crash, but perhaps not announced: announce it once.
            if not any(e["type"] == "done" for e in earlier):
                self.relay.send(request_id, done_frame(request_id, stored.id, stored.finish_reason,
                                                       stored.prompt_tokens or 0, stored.completion_tokens or 0),
                                wait=True)
            return stored.finish_reason or "stop"

        kept = self.finished.get(request_id) if repeat else None
        if kept is not None:  # generated in full before, but the primary failed to take it: store it now
            finish = self._store(request_id, req.conversation_id, **kept, accepted_at=req.accepted_at)
            self.finished.forget(request_id)
            return finish

        # A redelivered request continues after the tokens already streamed, so
        # the joined token texts still equal the stored reply.
        prefix = "".join(e["text"] for e in earlier if e["type"] == "token")
        seq = sum(1 for e in earlier if e["type"] == "token")
        max_new = req.params.max_new_tokens
        prefix_ids = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        room = self.engine.context_limit - max_new - len(prefix_ids)
        prompt_ids = build_prompt_ids(self.tokenizer, self.system_prompt, req.history, room)
        pieces = [prefix] if prefix else []
        timing = Timing(queue_wait_s=max(0.0, time.time() - req.accepted_at))
        last_piece = None

        def on_text(text: str) -> None:  # runs on the engine thread: queue, never wait long
            nonlocal seq, last_piece
            # The first token waits (briefly) until it is in Redis: the engine's next
            # step would otherwise hold the cores while the relay thread waits its turn,
            # adding milliseconds to the time to first token. Later tokens just queue.
            self.relay.send(request_id, token_frame(request_id, seq, text), wait=seq == 0,
                            timeout=FIRST_TOKEN_WAIT_S)
            pieces.append(text)
            seq += 1
            if self._itl is not None:
                now = time.time()
                if last_piece is not None:
                    self._itl.observe(now - last_piece)
                elif not prefix:  # a request picked up after a worker's death has had its first token
                    timing.first_token_s = now - req.accepted_at
                last_piece = now

        gen = SamplingParams(max_new_tokens=max(1, max_new - len(prefix_ids)), temperature=req.params.temperature)
        cancelled = self.cancels.watch(request_id)
        first_token_ms = None
        # In flight until its reply is stored and observed: a scrape that sees none in flight sees every figure.
        if self._in_flight is not None:
            self._in_flight.inc()
        try:
            try:
                result = self.engine.generate(prompt_ids + prefix_ids, gen, on_text, cancelled)
                finish, completion = result.finish_reason, len(prefix_ids) + result.completion_tokens
                if result.first_token_s is not None:
                    first_token_ms = 1000 * result.first_token_s
                timing.cached_tokens = result.cached_tokens
                if not prefix:  # a request picked up after a worker's death: its first token came before
                    timing.engine_wait_s, timing.engine_first_token_s = result.admitted_s, result.first_token_s
            except Exception:
                logger.exception("Generation failed for request %s", request_id)
                finish, completion = "error", len(prefix_ids)
            finally:
                self.cancels.unwatch(request_id)
            if finish == "cancelled" and self._handing_back.is_set():
                # Its stream must hold every frame sent so far before another worker reads it to go on.
                if not self.relay.sync(HAND_BACK_SYNC_S):
                    logger.error("Request %s handed back before its frames were in Redis", request_id)
                raise HandedBack(request_id)
            return self._store(request_id, req.conversation_id, "".join(pieces), finish, len(prompt_ids),
                               completion, first_token_ms, req.accepted_at, timing)
        finally:
            if self._in_flight is not None:
                self._in_flight.dec()

    def _store(self, request_id: str, conversation_id: str, text: str, finish: str, prompt_tokens: int,
               completion_tokens: int, first_token_ms: float | None = None, accepted_at: float | None = None,
               timing: Timing | None = None) -> str:
        """Store the reply and announce it with `done`. Should the primary fail, the reply is kept for the
        task's retry (:class:`workers.relay.FinishedReplies`), which stores it rather than generating on."""
        try:
            message_id = self.store.store_reply(request_id, conversation_id, text, finish, prompt_tokens,
                                                completion_tokens)
        except OperationalError:
            self.finished.keep(request_id, {"text": text, "finish": finish, "prompt_tokens": prompt_tokens,
                                            "completion_tokens": completion_tokens,
                                            "first_token_ms": first_token_ms})
            raise
        cached = timing.cached_tokens if timing is not None else None
        self.relay.send(request_id, done_frame(request_id, message_id, finish, prompt_tokens, completion_tokens,
                                               first_token_ms, cached), wait=True)
        if self.metrics_model is not None:
            metrics.observe_served(self.metrics_model, timing, time.time() - accepted_at if accepted_at else None,
                                   finish, prompt_tokens, completion_tokens)
        if message_id is None:  # its conversation was deleted meanwhile: its text goes from Redis too
            self.relay.forget(request_id)
        return finish
