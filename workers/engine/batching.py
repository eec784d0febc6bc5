"""The engine workers use: continuous batching on one model, driven by one thread that owns it."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

from app.protocol import SamplingParams
from workers.engine.prefix import PrefixIndex, PrefixStats
from workers.engine.request import GenerationResult, IncrementalDecoder, Request
from workers.engine.runner import ModelRunner, ModelSource, take
from workers.engine.scheduler import Scheduler, StepPlan
from workers.kernels import RowRule
from workers.model import LoadedModel

logger = logging.getLogger(__name__)

_FORGET = object()  # put in the incoming queue: drop the kept prompts, on the engine thread


class BatchingEngine:
    """Continuous batching on one model, driven by one thread that owns it.

    Each forward pass computes one token for every decoding request and, in
    the same pass, pieces of new prompts (chunked prefill): on this model a
    pass costs mostly one read of the weights, so a new prompt rides along
    with the decoding rows instead of stopping them for a pass of its own.
    The :class:`~workers.engine.scheduler.Scheduler` decides each pass, the
    :class:`~workers.engine.runner.ModelRunner` computes it; this class moves
    requests in and text out.

    Give it a loader rather than a loaded model to load on that thread: with
    torch's OpenMP, a model step ran up to twice as slow on a thread other
    than the first one in the process to do torch work.
    """

    def __init__(self, model: ModelSource, max_batch: int = 16, max_tokens: int = 2048,
                 prefill_tokens_per_pass: int = 64, shared_prefix: Callable[[object], list[int]] | None = None,
                 after_pass: Callable[[], None] = lambda: None, prefix_cache_mb: float = 0.0, nice: int = 0):
        self._model_source = model
        self._after_pass = after_pass  # called on the engine thread once a pass's text is handed out
        # The tokens every prompt starts with (the system prompt, templated), given
        # the tokenizer: their keys and values are computed once and copied in.
        self._shared_prefix = shared_prefix
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.prefill_tokens_per_pass = max(prefill_tokens_per_pass, 1)
        # Memory for the prompts of finished requests, kept for the next turn of their conversations (0: none).
        self.prefix_cache_mb = prefix_cache_mb
        self.nice = nice  # added to the engine thread's CPU niceness (and its torch threads', started from it)
        self.loaded: LoadedModel | None = None
        self.runner: ModelRunner | None = None
        self.scheduler: Scheduler | None = None
        self._ready = threading.Event()
        self._incoming: queue.Queue[Request | object | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self._start_error: Exception | None = None
        self.steps = 0

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt plus reply) one request may hold."""
        return self.max_tokens

    @property
    def prefix(self) -> list[int]:
        return self.scheduler.prefix if self.scheduler else []

    @property
    def kept_stats(self) -> PrefixStats:
        """How often prompts started with a kept one, and what is kept."""
        return self.scheduler.kept.stats

    @property
    def min_rows(self) -> int:
        return self.runner.min_rows

    @property
    def padded(self) -> dict[str, RowRule]:
        return self.runner.padded

    def start(self) -> BatchingEngine:
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise RuntimeError("engine could not start") from self._start_error
        return self

    def stop(self) -> None:
        self._stopping = True
        self._incoming.put(None)
        self._thread.join(30)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None],
               cancelled: threading.Event | None = None) -> Future:
        if self._stopping:
            raise RuntimeError("engine stopped")
        if not prompt_ids:
            raise ValueError("empty prompt")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.runner.vocab:
            raise ValueError(f"token ids must be in 0..{self.runner.vocab - 1}")
        budget = min(params.max_new_tokens, self.max_tokens - len(prompt_ids))
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in {self.max_tokens}")
        req = Request(list(prompt_ids), params, budget, cancelled or threading.Event(), on_text=on_text,
                      decoder=IncrementalDecoder(self.loaded.tokenizer))
        self._incoming.put(req)
        return req.future

    def forget_kept(self) -> None:
        """Drop every kept prompt: later prompts are computed whole until new ones are kept."""
        self._incoming.put(_FORGET)

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cancelled: threading.Event | None = None) -> GenerationResult:
        """Submit and wait for the end."""
        return self.submit(prompt_ids, params, on_text, cancelled).result()

    # --- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        lower_priority(self.nice)
        try:
            with torch.inference_mode():
                self._setup()
        except Exception as exc:
            logger.exception("Engine could not start")
            self._stopping, self._start_error = True, exc
            return
        finally:
            self._ready.set()
        sched = self.scheduler
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._take_incoming()
                    if sched.has_work:
                        self._step()
                except Exception as exc:
                    # A failed pass fails every request in it; the engine keeps serving.
                    logger.exception("Engine step failed")
                    _fail(sched.abort(), exc)
        while not self._incoming.empty():
            req = self._incoming.get_nowait()
            if isinstance(req, Request):
                sched.add(req)
        _fail(sched.abort(), RuntimeError("engine stopped"))

    def _setup(self) -> None:
        lm = self.loaded = take(self._model_source)
        runner = self.runner = ModelRunner(lm, self.max_batch, self.max_tokens, self.prefill_tokens_per_pass)
        runner.setup()
        self.max_tokens = runner.max_tokens
        prefix = self._shared_prefix(lm.tokenizer) if self._shared_prefix else []
        if not runner.fill_prefix(prefix):
            prefix = []
        kept = PrefixIndex(int(self.prefix_cache_mb * 2**20) // runner.bytes_per_token)
        self.scheduler = Scheduler(self.max_batch, self.max_tokens, self.prefill_tokens_per_pass, lm.eos_ids,
                                   prefix=prefix, prefix_row=runner.prefix_row, kept=kept)
        padded = ", ".join(f"{kind} in calls of {rule} rows" if rule.most else f"{kind} from {rule.least} rows"
                           if rule.step == 1 else f"{kind} to {rule}"
                           for kind, rule in runner.padded.items() if rule.pads)
        logger.info("Engine: %d slots; prompts kept for reuse: %s; %s; %s; whole passes give a row's logits alike "
                    "alone and in a batch %s (measured in %.1fs)", self.max_batch,
                    f"up to {kept.capacity_tokens} tokens ({self.prefix_cache_mb:g} MB)" if kept.enabled else "none", "lean Llama pass" if runner.lean else
                    "passes through the model's forward", f"linear layers padded: {padded}" if padded else
                    "no linear layer rounds by row count",
                    "unpadded" if runner.min_rows == 1 else f"padded to {runner.min_rows} rows", runner.invariance_s)

    def _take_incoming(self) -> None:
        """Move submitted requests to the scheduler; wait for one when there is nothing to do.

        Cache moves decided in the last pass (a kept prompt's keys and values to copy out) are something to do:
        made while the engine is idle, they do not delay the next request's first pass.
        """
        sched = self.scheduler
        while sched.has_room:
            try:
                req = self._incoming.get(block=not sched.has_work)
            except queue.Empty:
                return
            if req is None:
                return
            if req is _FORGET:
                sched.forget_kept()
                continue
            sched.add(req)

    def _step(self) -> None:
        """One pass: the next token of every decoding row, and pieces of waiting prompts."""
        plan = self.scheduler.schedule()
        self.runner.apply(plan.cache_ops)
        for req in plan.unstarted:
            req.future.set_result(GenerationResult("", "cancelled", len(req.prompt_ids), 0, None))
        if plan.empty:
            return
        self._compute(plan)
        self._after_pass()

    def _compute(self, plan: StepPlan) -> None:
        runner = self.runner
        logits = runner.forward(plan.decode_rows(), plan.pieces())
        self.steps += 1
        sampled = [*plan.decode, *plan.completing()]
        tokens = runner.sample(logits[:len(sampled)], [r.params for r in sampled])
        out = self.scheduler.update(plan, tokens)
        eos = self.loaded.eos_ids
        for req, token in out.tokens:
            if token not in eos:
                req.emit(req.decoder.push(token))
        for req, reason in out.finished:
            req.emit(req.decoder.flush())
            req.future.set_result(req.result(reason))


def lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: niceness is a thread's own, and the threads it
    starts take it, torch's OpenMP team among them when this thread is the first to run torch work)."""
    if nice <= 0:
        return
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + nice, 19))
    except (AttributeError, OSError) as exc:  # no setpriority here, or not allowed: the engine runs as it is
        logger.warning("Could not lower the engine thread's priority: %s", exc)


def _fail(reqs: list[Request], exc: BaseException) -> None:
    for req in reqs:
        if not req.future.done():
            req.future.set_exception(exc)
