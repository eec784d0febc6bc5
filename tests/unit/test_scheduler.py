"""The scheduler alone, without a model: plans checked against a cache simulated as lists of token ids."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from app.protocol import SamplingParams
from workers.engine.prefix import PrefixIndex
from workers.engine.request import Request
from workers.engine.scheduler import (IDLE_PREFILL_TOKENS, PREFILL_CHUNK, SPAN_BUCKET, Drop, Load, Move, Save,
                                      Scheduler, StepPlan, Swap, span_of)

EOS = 2
PREFIX = [1, 5, 6, 7]


class SimulatedCache:
    """What each cache row holds, as the token ids written there; a runner that applies plans as the real one."""

    def __init__(self, rows: int, prefix_row: int):
        self.rows = [[] for _ in range(rows)]
        self.rows[prefix_row] = list(PREFIX)
        self.kept: dict[int, list[int]] = {}

    def write(self, row: int, position: int, token: int) -> None:
        held = self.rows[row]
        held.extend([None] * (position + 1 - len(held)))
        held[position] = token

    def run(self, plan: StepPlan) -> None:
        # A row's positions past what an operation copies hold nothing of its new owner's: forgotten here.
        for op in plan.cache_ops:
            if isinstance(op, Move):
                self.rows[op.dst] = self.rows[op.src][:op.length]
            elif isinstance(op, Save):
                self.kept[op.entry] = self.rows[op.row][:op.length]
                assert len(self.kept[op.entry]) == op.length
            elif isinstance(op, Load):
                assert len(self.kept[op.entry]) >= op.length
                self.rows[op.row] = self.kept[op.entry][:op.length]
            elif isinstance(op, Drop):
                del self.kept[op.entry]
            else:
                self.rows[op.a], self.rows[op.b] = self.rows[op.b][:op.length], self.rows[op.a][:op.length]
        for req in plan.decode:
            assert self.rows[req.row][:req.length] == (req.prompt_ids + req.output_ids)[:req.length]
            self.write(req.row, req.length, req.last_token)
        for chunk in plan.chunks:
            req = chunk.request
            assert self.rows[req.row][:chunk.first] == req.prompt_ids[:chunk.first]
            for pos in range(chunk.first, chunk.first + chunk.length):
                self.write(req.row, pos, req.prompt_ids[pos])


def request(prompt: list[int], max_new: int, max_tokens: int = 512) -> Request:
    return Request(prompt, SamplingParams(max_new), budget=min(max_new, max_tokens - len(prompt)))


def check(plan: StepPlan, sched: Scheduler) -> None:
    """The rules every plan keeps."""
    assert [r.row for r in plan.decode] == list(range(len(plan.decode)))
    assert list(plan.spans) == sorted(plan.spans, reverse=True)
    assert all(span == span_of(r.length, sched.max_tokens) for r, span in zip(plan.decode, plan.spans))
    rows = [r.row for r in sched.running + sched.filling + sched.keepers]
    assert len(rows) == len(set(rows)) and all(0 <= r < sched.slots for r in rows)
    assert len(rows) <= sched.slots
    for chunk in plan.chunks:  # cut at fixed places from where the prompt's computation started
        assert (chunk.first - chunk.request.origin) % PREFILL_CHUNK == 0
        assert 1 <= chunk.length <= PREFILL_CHUNK
    if len(plan.chunks) > 1:  # the budget beside decoding rows, the larger one when none decodes
        room = sched.prefill_tokens_per_pass if plan.decode else max(sched.prefill_tokens_per_pass,
                                                                     IDLE_PREFILL_TOKENS)
        assert sum(c.length for c in plan.chunks) <= room


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 6), budget=st.integers(1, 400), rng=st.randoms(use_true_random=False),
       kept=st.sampled_from([0, 300, 2000]),
       arrivals=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 90), st.booleans(), st.integers(0, 3)),
                         min_size=1, max_size=14))
def test_plans_keep_every_row_of_the_cache_true_to_its_request_and_every_request_finishes_once(
        slots, budget, rng, kept, arrivals):
    """Requests arrive, are cancelled and end at random, some starting with an earlier one's prompt; each pass's
    decoding rows and prompt pieces find their own tokens in the rows the plan's moves and kept prompts left
    them, and every request ends exactly once."""
    sched = Scheduler(slots, 512, budget, frozenset({EOS}), prefix=PREFIX, prefix_row=slots,
                      kept=PrefixIndex(kept))
    cache = SimulatedCache(slots + 2, slots)
    pending = []
    for n, (length, max_new, with_prefix, earlier) in enumerate(arrivals):
        prompt = [100 + (n * 131 + i * 7919) % 5000 for i in range(length)]  # no two alike
        if earlier and pending:  # a later turn: an earlier request's prompt and more
            prompt = pending[-earlier % len(pending)].prompt_ids[:400] + prompt[:100]
        elif with_prefix:
            prompt = PREFIX + prompt
        pending.append(request(prompt, max_new))
    finished = {}
    for _ in range(5000):
        if pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        if rng.random() < 0.1 and (sched.running or sched.filling):
            rng.choice(sched.running + sched.filling).cancelled.set()
        plan = sched.schedule()
        for req in plan.unstarted:
            assert id(req) not in finished
            finished[id(req)] = "cancelled"
        check(plan, sched)
        cache.run(plan)
        if plan.empty:
            if not pending and not sched.waiting and not sched.busy:
                break
            continue
        tokens = [EOS if rng.random() < 0.03 else rng.choice([40, 41, 42, 43])
                  for _ in range(len(plan.decode) + len(plan.completing()))]
        out = sched.update(plan, tokens)
        assert [t for _, t in out.tokens] == tokens
        for req, reason in out.finished:
            assert id(req) not in finished
            finished[id(req)] = reason
            assert len(req.output_ids) <= req.budget
            assert (reason == "stop") == (req.output_ids[-1] == EOS) or reason == "cancelled"
            assert reason != "length" or len(req.output_ids) == req.budget
    assert len(finished) == len(arrivals)
    assert sum(len(t) for t in cache.kept.values()) <= kept and len(cache.kept) == len(sched.kept)


def test_a_prompt_that_starts_with_a_kept_one_takes_its_whole_pieces_and_computes_the_rest_as_it_would():
    sched = Scheduler(2, 1024, 1024, frozenset({EOS}), prefix=PREFIX, prefix_row=2, kept=PrefixIndex(10_000))
    first = request(PREFIX + list(range(100, 400)), 3, 1024)  # 4 + 300 tokens: two whole pieces after the prefix
    sched.add(first)
    plan = sched.schedule()
    assert [(c.first, c.length) for c in plan.chunks] == [(4, 128), (132, 128), (260, 44)]
    sched.update(plan, [40])
    sched.update(sched.schedule(), [41])
    out = sched.update(sched.schedule(), [42])
    assert out.finished == [(first, "length")]
    assert sched.schedule().cache_ops == (Save(0, 0, 260),)  # the prompt's whole pieces, from its row
    turn = request(first.prompt_ids + [40, 41, 7] + list(range(500, 600)), 3, 1024)
    sched.add(turn)
    plan = sched.schedule()
    assert plan.cache_ops == (Load(0, 0, 260),) and turn.reused == 260
    # The rest is cut where it would be without the kept prompt: at 4 + 128k.
    assert [(c.first, c.length) for c in plan.chunks] == [(260, 128), (388, 19)]
    stats = sched.kept.stats
    assert (stats.lookups, stats.hits, stats.reused_tokens) == (2, 1, 260)
    sched.update(plan, [EOS])
    assert sched.schedule().cache_ops == (Drop(0), Save(0, 1, 388))  # the longer prompt holds the shorter whole


def test_a_prompt_that_starts_with_the_shared_prefix_copies_it_and_computes_only_the_rest():
    sched = Scheduler(4, 512, 256, frozenset({EOS}), prefix=PREFIX, prefix_row=4)
    with_prefix, without = request(PREFIX + [9] * 300, 5), request([9] * 10, 5)
    sched.add(with_prefix), sched.add(without)
    plan = sched.schedule()
    assert plan.cache_ops == (Move(4, with_prefix.row, len(PREFIX)),)
    assert [(c.request, c.first, c.length) for c in plan.chunks] == [
        (with_prefix, 4, 128), (with_prefix, 132, 128)]  # the budget: 256 prompt tokens a pass
    sched.update(plan, [])
    plan = sched.schedule()
    assert [(c.request, c.first, c.length) for c in plan.chunks] == [(with_prefix, 260, 44), (without, 0, 10)]
    assert plan.completing() == [with_prefix, without]
    out = sched.update(plan, [40, 41])
    assert out.tokens == [(with_prefix, 40), (without, 41)] and sched.running == [with_prefix, without]
    assert (with_prefix.row, without.row) == (0, 1) and with_prefix.length == 304


def test_new_prompts_beside_decoding_rows_take_the_small_budget_and_an_idle_pass_the_large_one():
    """A burst of prompts is cut into short passes while rows decode; with none decoding a pass takes more."""
    sched = Scheduler(8, 512, 40, frozenset({0}))
    for _ in range(6):
        sched.add(request([5] * 30, 4))
    first = sched.schedule()  # nothing decodes yet: up to IDLE_PREFILL_TOKENS, whole pieces only
    assert not first.decode and [c.length for c in first.chunks] == [30] * 6
    assert IDLE_PREFILL_TOKENS >= 180
    sched.update(first, [1] * 6)
    for _ in range(4):
        sched.add(request([6] * 30, 4))
    beside = sched.schedule()  # six rows decode: one piece, then no more than 40 tokens
    assert len(beside.decode) == 6 and [c.length for c in beside.chunks] == [30]
    sched.update(beside, [1] * 7)
    assert [c.length for c in sched.schedule().chunks] == [30]


def test_a_row_that_outgrows_its_span_moves_ahead_of_shorter_rows():
    sched = Scheduler(2, 512, 512, frozenset({EOS}))
    short, long = request([9] * 3, 100), request([9] * (SPAN_BUCKET - 3), 100)
    sched.add(short), sched.add(long)
    sched.update(sched.schedule(), [40, 40])
    assert sched.running == [short, long]  # both in the first bucket
    for _ in range(3):  # the long one's length: 61, 62 and 63 tokens, each with room for its next in one bucket
        plan = sched.schedule()
        assert not plan.cache_ops
        sched.update(plan, [40, 40])
    plan = sched.schedule()  # at 64 its next token needs a second bucket: it moves to row 0
    assert plan.cache_ops == (Swap(1, 0, SPAN_BUCKET),) and plan.decode == (long, short)
    assert plan.spans == (2 * SPAN_BUCKET, SPAN_BUCKET)


def test_a_finished_row_is_filled_by_the_last_one_and_a_cancelled_waiting_request_never_starts():
    sched = Scheduler(3, 512, 512, frozenset({EOS}))
    a, b, c, d = (request([9] * 5, 1 if i == 0 else 10) for i in range(4))
    for r in (a, b, c):
        sched.add(r)
    out = sched.update(sched.schedule(), [40, 41, 42])
    assert out.finished == [(a, "length")] and sched.running == [c, b]
    d.cancelled.set()
    sched.add(d)
    plan = sched.schedule()
    assert plan.unstarted == (d,) and plan.cache_ops == (Move(2, 0, 5),)
    out = sched.update(plan, [EOS, 43])
    assert out.finished == [(c, "stop")] and sched.running == [b] and b.row == 0


def test_the_scheduler_loads_without_torch():
    code = ("import sys, workers.engine.scheduler, workers.engine.request; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_prompt_done_in_a_row_above_a_later_one_still_in_its_rows_exchanges_places_with_it():
    """B fills row 1 while A decodes in row 0; A ends, C takes row 0; B's and C's prompts end in one pass:
    B takes decoding row 0 and C goes on in row 1, each with its own tokens."""
    sched = Scheduler(2, 1024, 256, frozenset({EOS}))
    cache = SimulatedCache(4, 2)
    a, b, c = request([7] * 5, 2, 1024), request(list(range(100, 700)), 5, 1024), request([8] * 100, 5, 1024)
    sched.add(a)

    def step(tokens_for=lambda n: [40] * n):
        plan = sched.schedule()
        cache.run(plan)
        return plan, sched.update(plan, tokens_for(len(plan.decode) + len(plan.completing())))

    step()
    sched.add(b)
    assert b.row == -1 and step()[1].finished == [(a, "length")]
    assert b.row == 1 and b.filled == 256
    sched.add(c)
    plan, _ = step()
    assert c.row == 0 and b.filled == 512 and not plan.completing()
    plan, _ = step()
    assert plan.completing() == [b, c]
    assert sched.running == [b, c] and (b.row, c.row) == (0, 1)
    plan, _ = step()  # the simulated cache checks that each row holds its request's tokens
    assert plan.cache_ops == (Swap(1, 0, 600),) and plan.decode == (b, c)


def test_a_reply_that_adds_whole_pieces_is_computed_again_as_a_prompt_in_a_free_row_and_kept_with_it():
    sched = Scheduler(2, 1024, 256, frozenset({EOS}), kept=PrefixIndex(10_000))
    cache = SimulatedCache(4, 2)
    first = request(list(range(100, 200)), 40, 1024)  # 100 prompt tokens: no whole piece, until the reply's
    sched.add(first)

    def step():
        plan = sched.schedule()
        cache.run(plan)
        sched.update(plan, [50 + len(first.output_ids)] * (len(plan.decode) + len(plan.completing())))
        return plan

    while first.finish_reason is None:
        step()
    assert len(first.output_ids) == 40 and sched.keepers  # 140 tokens: one whole piece, mostly prompt
    [keeper] = sched.keepers
    assert keeper.keep_only and keeper.prompt_ids == (first.prompt_ids + first.output_ids)[:128]
    plan = step()
    assert plan.cache_ops == (Move(0, keeper.row, 0),)  # no whole piece of the prompt alone to keep first
    assert [(c.request, c.first, c.length, c.completes) for c in plan.chunks] == [(keeper, 0, 128, False)]
    assert plan.pieces()[0].last is False and not plan.completing()
    plan = step()
    assert plan.cache_ops == (Save(keeper.row, 0, 128),) and not sched.keepers and not sched.busy
    turn = request(first.prompt_ids + first.output_ids + [7] * 30, 5, 1024)
    sched.add(turn)
    plan = step()
    assert plan.cache_ops == (Load(0, 0, 128),) and turn.reused == 128


def test_a_request_takes_the_row_of_a_reply_being_computed_again_which_keeps_what_it_has():
    sched = Scheduler(1, 1024, 256, frozenset({EOS}), kept=PrefixIndex(10_000))
    first = request(list(range(100, 200)), 40, 1024)
    sched.add(first)
    while first.finish_reason is None:
        plan = sched.schedule()
        sched.update(plan, [60] * (len(plan.decode) + len(plan.completing())))
    assert not sched.keepers  # the only row was its own: nothing free to compute the reply in
    sched = Scheduler(2, 1024, 128, frozenset({EOS}), kept=PrefixIndex(10_000))
    first, other = request(list(range(100, 400)), 300, 1024), request([9] * 5, 1, 1024)
    sched.add(first)
    while first.finish_reason is None:
        plan = sched.schedule()
        sched.update(plan, [60] * (len(plan.decode) + len(plan.completing())))
    [keeper] = sched.keepers  # 600 tokens: the pieces at 256 and 384 to compute again, one a pass
    plan = sched.schedule()
    sched.update(plan, [])
    assert keeper.filled == 384 and sched.keepers
    sched.add(other), sched.add(request([9] * 6, 1, 1024))
    plan = sched.schedule()  # the second request needs the keeper's row: the keeper keeps its 384 tokens
    assert Save(keeper.row, 1, 384) in plan.cache_ops and not sched.keepers
    assert len(sched.filling) == 2
