"""What each forward pass computes: pure Python, no torch, testable without a model.

The scheduler holds the requests (waiting, filling their rows with prompt
pieces, decoding) and the cache rows they own. :meth:`Scheduler.schedule`
returns a :class:`StepPlan` for the next pass; the runner computes it and
:meth:`Scheduler.update` takes the sampled tokens back. Rows of the cache are
moved by :class:`CacheOp` entries of the plan, which the runner applies in
order before the pass: the scheduler decides, the runner copies.

Rules that keep a request's greedy text independent of its neighbours:

- A prompt is cut into pieces of :data:`PREFILL_CHUNK` tokens at fixed places
  from where its computation starts, whatever else is waiting; a pass takes
  pieces up to ``prefill_tokens_per_pass`` tokens beside decoding rows, up to
  :data:`IDLE_PREFILL_TOKENS` when no row decodes (at least one piece), first
  come first.
- A decoding row attends over its length rounded up to :data:`SPAN_BUCKET`
  positions (:func:`span_of`); decoding rows are kept in decreasing order of
  span, so that each bucket is one range of rows.
- A prompt that starts with the shared prefix (the system prompt) always
  computes only the rest, alone or not; its pieces are cut from there.
- A prompt that starts with a kept one (:mod:`workers.engine.prefix`: the
  whole pieces of an earlier prompt, such as the conversation's last turn)
  takes that one's keys and values and computes only the rest, cut at the
  same places as it would be without them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from workers.engine.prefix import PrefixIndex
from workers.engine.request import Request

# A decoding row attends over its length rounded up to this many positions:
# fewer wasted positions against more groups per pass.
SPAN_BUCKET = 64
# A prompt is computed in pieces of this many tokens, cut at fixed places.
PREFILL_CHUNK = 128
# The most prompt tokens a pass takes when no row decodes: nobody waits on a longer pass then, and larger passes
# read the weights fewer times for a long prompt.
IDLE_PREFILL_TOKENS = 256


def span_of(length: int, max_tokens: int) -> int:
    """Positions a row of ``length`` tokens attends over once its next token is in: rounded up to a bucket."""
    return min(-(-(length + 1) // SPAN_BUCKET) * SPAN_BUCKET, max_tokens)


class Move(NamedTuple):
    """Copy the first ``length`` positions of cache row ``src`` into row ``dst``."""
    src: int
    dst: int
    length: int


class Swap(NamedTuple):
    """Exchange the first ``length`` positions of cache rows ``a`` and ``b``."""
    a: int
    b: int
    length: int


class Save(NamedTuple):
    """Keep the first ``length`` positions of cache row ``row`` as prefix entry ``entry``."""
    row: int
    entry: int
    length: int


class Load(NamedTuple):
    """Copy kept prefix entry ``entry`` (``length`` positions) into cache row ``row``."""
    entry: int
    row: int
    length: int


class Drop(NamedTuple):
    """Free kept prefix entry ``entry``."""
    entry: int


CacheOp = Move | Swap | Save | Load | Drop


class DecodeRow(NamedTuple):
    """A decoding row of a pass, in cache row order: its tokens in the cache, the token it feeds, its span."""
    length: int
    token: int
    span: int


class PromptPiece(NamedTuple):
    """Prompt tokens ``first`` to ``first + length`` of ``tokens``, computed into cache row ``row``; ``last``: the
    prompt's last piece, whose last token's logits give the request's first token."""
    tokens: list[int]
    row: int
    first: int
    length: int
    last: bool


@dataclass(frozen=True)
class Chunk:
    request: Request
    first: int
    length: int

    @property
    def completes(self) -> bool:
        """The last piece of a request's prompt (not of a reply computed again to be kept: no token follows)."""
        return not self.request.keep_only and self.first + self.length == len(self.request.prompt_ids)


@dataclass(frozen=True)
class StepPlan:
    """One pass: the cache moves to make first, the decoding rows (cache rows 0, 1, ... in order), the prompt
    pieces, and the requests that left before they started (cancelled while waiting or filling)."""

    cache_ops: tuple[CacheOp, ...] = ()
    decode: tuple[Request, ...] = ()
    spans: tuple[int, ...] = ()
    chunks: tuple[Chunk, ...] = ()
    unstarted: tuple[Request, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.decode and not self.chunks

    def decode_rows(self) -> list[DecodeRow]:
        return [DecodeRow(r.length, r.last_token, span) for r, span in zip(self.decode, self.spans)]

    def pieces(self) -> list[PromptPiece]:
        return [PromptPiece(c.request.prompt_ids, c.request.row, c.first, c.length, c.completes) for c in self.chunks]

    def completing(self) -> list[Request]:
        """The requests whose last prompt piece this pass computes: their first token comes from it."""
        return [c.request for c in self.chunks if c.completes]


@dataclass
class StepOutput:
    """What a pass did: each (request, token) taken, in order, and the requests that are finished."""

    tokens: list[tuple[Request, int]] = field(default_factory=list)
    finished: list[tuple[Request, str]] = field(default_factory=list)  # (request, finish reason)


class Scheduler:
    """Continuous batching over ``slots`` cache rows, with chunked prefill.

    Decoding requests hold rows ``0 .. n-1`` (packed); a filling request holds a
    free row above them until its prompt is in, then takes row ``n``. Row
    ``prefix_row`` holds the shared prefix's keys and values.
    """

    def __init__(self, slots: int, max_tokens: int, prefill_tokens_per_pass: int, eos_ids: frozenset[int],
                 prefix: list[int] | None = None, prefix_row: int = -1, kept: PrefixIndex | None = None):
        self.slots = slots
        self.max_tokens = max_tokens
        self.prefill_tokens_per_pass = max(prefill_tokens_per_pass, 1)
        self.eos_ids = eos_ids
        self.prefix = list(prefix or [])
        self.prefix_row = prefix_row
        self.kept = kept if kept is not None else PrefixIndex(0)  # prompts kept for reuse; none by default
        self.waiting: deque[Request] = deque()
        self.filling: list[Request] = []  # first come first
        self.running: list[Request] = []  # running[i] decodes in cache row i
        # Finished conversations' turns whose replies are computed again as prompt pieces, to be kept whole
        # (see _keep); each holds a free row, given up for any request that needs it.
        self.keepers: list[Request] = []
        self._ops: list[CacheOp] = []  # moves decided since the last plan

    @property
    def busy(self) -> bool:
        return bool(self.running or self.filling or self.keepers)

    @property
    def has_moves(self) -> bool:
        """Whether cache moves are decided but not made: the next plan carries them, even with nothing to compute
        (a finished keeper's keys and values to save, kept prompts to drop)."""
        return bool(self._ops)

    @property
    def has_work(self) -> bool:
        """Whether the engine has a pass to make: requests in, waiting, or moves to make."""
        return self.busy or bool(self.waiting) or self.has_moves

    @property
    def has_room(self) -> bool:
        return len(self.running) + len(self.filling) < self.slots

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def abort(self) -> list[Request]:
        """Drop every request (a failed pass): they are returned for the caller to fail."""
        reqs = self.running + self.filling + list(self.waiting)
        self.running, self.filling, self.keepers = [], [], []
        # Moves decided but not made are void; kept prompts may be half saved: forget them all.
        self._ops = [Drop(entry) for entry in self.kept.clear()]
        self.waiting.clear()
        return reqs

    def forget_kept(self) -> None:
        """Drop every kept prompt (their memory is freed by the next plan), and the replies being computed again."""
        self.keepers = []
        self._ops += [Drop(entry) for entry in self.kept.clear()]

    @property
    def prefill_room(self) -> int:
        """The most prompt tokens the coming pass takes (at least one piece).

        Beside decoding rows, ``prefill_tokens_per_pass``: a small budget cuts a
        burst of new prompts into short passes, so the first of them get their
        first tokens early and the rows decoding wait less for each pass.
        """
        return self.prefill_tokens_per_pass if self.running else max(self.prefill_tokens_per_pass,
                                                                      IDLE_PREFILL_TOKENS)

    def span(self, length: int) -> int:
        return span_of(length, self.max_tokens)

    def schedule(self) -> StepPlan:
        unstarted = self._admit()
        for req in [r for r in self.filling if r.cancelled.is_set()]:
            self.filling.remove(req)
            unstarted.append(req)
        spans = self._order_rows()
        chunks = self._chunks()
        ops, self._ops = tuple(self._ops), []
        if not self.running and not chunks:
            # Nothing to compute; the moves still have to happen before any later pass.
            return StepPlan(cache_ops=ops, unstarted=tuple(unstarted))
        return StepPlan(ops, tuple(self.running), tuple(spans), tuple(chunks), tuple(unstarted))

    def update(self, plan: StepPlan, tokens: list[int]) -> StepOutput:
        """The pass's sampled tokens: one per decoding row, then one per request whose prompt it completed."""
        out = StepOutput()
        for chunk in plan.chunks:
            chunk.request.filled = chunk.first + chunk.length
        for keeper in [k for k in self.keepers if k.prompt_done]:
            self._keep_computed(keeper)
        completing = plan.completing()
        rows = len(plan.decode)
        for req, token in zip(plan.decode, tokens[:rows]):
            req.append(token, self.eos_ids)
            out.tokens.append((req, token))
        for req, token in zip(completing, tokens[rows:rows + len(completing)]):
            self._start_decoding(req)
            req.append(token, self.eos_ids)
            out.tokens.append((req, token))
        self._retire(out)
        return out

    # --- rules ------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        """Give waiting requests free rows; their prompts are computed by the coming passes."""
        unstarted = []
        while self.waiting and self.has_room:
            req = self.waiting.popleft()
            if req.cancelled.is_set():
                unstarted.append(req)
                continue
            if len(self.running) + len(self.filling) + len(self.keepers) >= self.slots:
                self._keep_computed(self.keepers[0])  # a request before a reply computed again: keep what is done
            taken = {r.row for r in self.filling + self.keepers}
            req.row = next(s for s in range(len(self.running), self.slots) if s not in taken)
            req.admitted_s = time.monotonic() - req.submitted
            req.origin = req.filled = self._cached_prefix_len(req.prompt_ids)
            hit = self.kept.lookup(req.prompt_ids, req.origin, PREFILL_CHUNK) if self.kept.enabled else None
            if hit is not None:
                entry, req.filled = hit
                self._ops.append(Load(entry, req.row, req.filled))
            elif req.filled:
                self._ops.append(Move(self.prefix_row, req.row, req.filled))
            req.reused = req.filled
            self.filling.append(req)
        return unstarted

    def _cached_prefix_len(self, prompt_ids: list[int]) -> int:
        n = len(self.prefix)
        return n if n and len(prompt_ids) > n and prompt_ids[:n] == self.prefix else 0

    def _chunks(self) -> list[Chunk]:
        chunks, room = [], self.prefill_room
        for req in self.filling:
            first = req.filled
            while first < len(req.prompt_ids):
                length = min(PREFILL_CHUNK, len(req.prompt_ids) - first)
                if chunks and length > room:
                    return chunks
                chunks.append(Chunk(req, first, length))
                room -= length
                first += length
        # Replies computed again only in passes of their own, when nothing else is to compute, one piece a pass:
        # they never slow a pass of requests, and a request that comes meanwhile waits one short pass at most.
        if not chunks and not self.running and self.keepers:
            keeper = self.keepers[0]
            chunks.append(Chunk(keeper, keeper.filled, PREFILL_CHUNK))
        return chunks

    def _order_rows(self) -> list[int]:
        """Keep decoding rows in decreasing order of span; their spans.

        A row that outgrows its bucket swaps places with the first row of a
        smaller span: two rows of the cache exchanged, once per bucket crossed.
        """
        rows = self.running
        spans = [self.span(r.length) for r in rows]
        i = 1
        while i < len(spans):
            if spans[i] <= spans[i - 1]:
                i += 1
                continue
            j = next(r for r in range(i) if spans[r] < spans[i])
            self._ops.append(Swap(i, j, max(rows[i].length, rows[j].length)))
            rows[i], rows[j] = rows[j], rows[i]
            rows[i].row, rows[j].row = i, j
            spans[i], spans[j] = spans[j], spans[i]
            i = max(j, 1)
        return spans

    def _whole(self, origin: int, length: int) -> int:
        """The end of the last whole piece of ``length`` tokens whose pieces are cut from ``origin``."""
        return origin + (length - origin) // PREFILL_CHUNK * PREFILL_CHUNK

    def _keep(self, req: Request) -> None:
        """Keep the whole pieces of a leaving request's prompt, from its row, for a later prompt that starts so.

        Its reply's keys and values were computed while decoding, one token at a time, with other arithmetic
        than a prompt piece: the conversation's next prompt, computed whole, would not give the same. So where
        the reply adds whole pieces and a row is free, those pieces are computed again as a prompt's would be
        (a keeper, in passes when the engine has nothing else to do) and the longer prompt is kept once they
        are in.
        """
        if not self.kept.enabled:
            return
        whole = self._whole(req.origin, len(req.prompt_ids))
        if whole > req.origin:
            self._save(req.row, req.prompt_ids[:whole])
        tokens = req.prompt_ids + req.output_ids
        longer = self._whole(req.origin, len(tokens))
        taken = {r.row for r in self.running + self.filling + self.keepers}
        free = next((s for s in range(self.slots) if s not in taken), None)
        if longer > whole and free is not None and longer <= self.kept.capacity_tokens:
            self._ops.append(Move(req.row, free, whole))
            self.keepers.append(Request(tokens[:longer], req.params, 0, row=free, filled=whole, origin=req.origin,
                                        keep_only=True))

    def _keep_computed(self, keeper: Request) -> None:
        """Keep what a keeper has computed (all of it, or as far as it got) and free its row."""
        self.keepers.remove(keeper)
        if keeper.filled > keeper.origin:
            self._save(keeper.row, keeper.prompt_ids[:keeper.filled])

    def _save(self, row: int, tokens: list[int]) -> None:
        entry, dropped = self.kept.insert(tokens)
        self._ops += [Drop(d) for d in dropped]
        if entry is not None:
            self._ops.append(Save(row, entry, len(tokens)))

    def _start_decoding(self, req: Request) -> None:
        """A request whose prompt is in takes the next decoding row (rows stay packed from 0)."""
        self.filling.remove(req)
        row = len(self.running)
        if req.row != row:
            other = next((r for r in self.filling + self.keepers if r.row == row), None)
            if other is None:
                self._ops.append(Move(req.row, row, len(req.prompt_ids)))
            else:
                self._ops.append(Swap(req.row, row, max(len(req.prompt_ids), other.filled)))
                other.row = req.row
            req.row = row
        self.running.append(req)

    def _retire(self, out: StepOutput) -> None:
        """Finished and cancelled requests leave; the last row moves into each freed one."""
        row = 0
        while row < len(self.running):
            req = self.running[row]
            reason = req.finish_reason or ("cancelled" if req.cancelled.is_set() else None)
            if reason is None:
                row += 1
                continue
            out.finished.append((req, reason))
            self._keep(req)
            last = self.running.pop()
            if last is not req:
                self._ops.append(Move(last.row, row, last.length))
                last.row = row
                self.running[row] = last
            req.row = -1
