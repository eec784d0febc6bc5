"""Generation engines: they decode requests and hand out text as it comes.

Engines know nothing of Celery or Redis. A caller submits token ids, sampling
parameters, a callback for new text and a cancel event, and waits for the
result; the callback runs on the engine's thread and must be quick.

- :class:`BatchingEngine` is the one workers use: one thread owns the model
  and decodes every active request together, one token per request per step.
  Requests join between steps (prompts of one length prefilled in one pass)
  and leave as soon as they finish or are cancelled (continuous batching).
- :class:`GenerateEngine` is the baseline: one ``model.generate()`` call per
  request, one at a time.

What transformers ships and what is written here: the model's own forward
pass, rotary embeddings and (for prefill) SDPA do the work; a decode step's
attention is :func:`ragged_attention`, registered with transformers'
``AttentionInterface``. transformers' own
continuous batching (``init_continuous_batching``) applies one generation
config to every request (no per-request temperature) and its paged cache was
slower than a padded batch on CPU, so the scheduling and the KV cache are
ours: :class:`RaggedKVCache` is preallocated once, one row per batch slot, and
each row keeps its own length, so requests of any length share a step without
padding shifts or concatenation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from workers.kernels import invariant_rows
from workers.model import LoadedModel

logger = logging.getLogger(__name__)

# A decoding row attends over its length rounded up to this many positions:
# fewer wasted positions against more groups per step (64 measured best here).
SPAN_BUCKET = 64


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None = None


class IncrementalDecoder:
    """Turns token ids into text pieces whose concatenation is the decoded whole.

    Decodes a small window (as TGI does), so each token costs the same however
    long the reply; a piece is held back while it ends in an incomplete UTF-8
    sequence.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")) and text.startswith(prefix):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerationParams
    on_text: Callable[[str], None]
    cancelled: threading.Event
    future: Future
    decoder: IncrementalDecoder
    submitted: float = field(default_factory=time.monotonic)
    pieces: list[str] = field(default_factory=list)
    generated: int = 0
    first_token_s: float | None = None
    budget: int = 0
    finish_reason: str | None = None

    def emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.on_text(piece)


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, ragged_groups=None,
                     **kwargs):
    """Attention for a decode step whose rows attend over spans of their own.

    One call over the batch's longest span gives a short row different
    rounding in bfloat16 than the same row alone, and with it different greedy
    text. So each row attends over its length rounded up to a bucket
    (:data:`SPAN_BUCKET`), whatever its neighbours: rows of one bucket share a
    call, and a row's arithmetic never depends on what else is in the batch.
    The engine keeps the rows ordered by span, so each bucket is one range of rows.
    For one query token, two batched matrix products and a float32 softmax run
    several times faster on CPU than SDPA's kernel with a mask. Anything but
    such a decode step is plain SDPA.
    """
    if ragged_groups is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = scaling if scaling is not None else dim ** -0.5
    out = query.new_empty(rows, heads, dim)
    for start, stop, span, bias in ragged_groups:
        # Slices of the cache, never copies: a row's operands keep the same layout in any batch.
        n = (stop - start) * kv_heads
        q = query[start:stop].reshape(n, group, dim)
        k = key[start:stop, :, :span].reshape(n, span, dim)
        v = value[start:stop, :, :span].reshape(n, span, dim)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # bias: 0 to attend, -inf beyond the row
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        torch.bmm(probs, v, out=out[start:stop].view(n, group, dim))
    return out.view(rows, 1, heads, dim), None


AttentionInterface.register("ragged", ragged_attention)
AttentionMaskInterface.register("ragged", sdpa_mask)


class RaggedKVCache:
    """Preallocated keys and values, one row per batch slot, each row with its own length.

    The model calls :meth:`update` once per layer per forward pass; before each
    pass the engine says which rows take part and where their new tokens go.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._flat: torch.Tensor | None = None
        self._head_offsets = torch.arange(kv_heads, device=device)[None, :] * max_tokens
        self._span = 0
        self._prefill_slots: torch.Tensor | None = None
        self._start = 0

    def for_prefill(self, slots: torch.Tensor, width: int, start: int = 0) -> None:
        """Rows ``slots`` take ``width`` new prompt tokens at positions ``start`` on (after a cached prefix)."""
        self._prefill_slots, self._span, self._start = slots, width, start

    def for_decode(self, positions: torch.Tensor, span: int) -> None:
        """Rows 0..n-1 take part; row i's new token goes to ``positions[i]``."""
        self._prefill_slots = None
        self._span = span
        # Where each row's and head's new key goes in a layer's cache seen as (slots * heads * tokens, dim):
        # one index_copy_ per layer instead of an indexed assignment.
        _, heads, tokens, _ = self.keys[0].shape
        rows = torch.arange(len(positions), device=positions.device)
        self._flat = ((rows * heads * tokens + positions)[:, None] + self._head_offsets).reshape(-1)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self._prefill_slots is not None:
            start, stop = self._start, self._start + self._span
            k[self._prefill_slots, :, start:stop] = key
            v[self._prefill_slots, :, start:stop] = value
            if start == 0:
                return key, value
            return k[self._prefill_slots, :, :stop], v[self._prefill_slots, :, :stop]
        dim = k.shape[-1]
        k.view(-1, dim).index_copy_(0, self._flat, key.reshape(-1, dim))
        v.view(-1, dim).index_copy_(0, self._flat, value.reshape(-1, dim))
        # The whole cache: ragged_attention slices each span group's rows and positions itself.
        return k, v

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of slots ``a`` and ``b``."""
        for k, v in zip(self.keys, self.values):
            for t in (k, v):
                held = t[a, :, :length].clone()
                t[a, :, :length] = t[b, :, :length]
                t[b, :, :length] = held

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst``."""
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]


ModelSource = LoadedModel | Callable[[], LoadedModel]


def _take(model: ModelSource) -> LoadedModel:
    """The model itself, loading it here (on the calling thread) when given a loader."""
    return model() if callable(model) else model


class BatchingEngine:
    """Continuous batching on one model, driven by one thread that owns it.

    Give it a loader rather than a loaded model to load on that thread: with
    torch's OpenMP, a model step ran up to twice as slow on a thread other
    than the first one in the process to do torch work.
    """

    def __init__(self, model: ModelSource, max_batch: int = 16, max_tokens: int = 2048,
                 prefill_tokens_per_step: int = 512, shared_prefix: Callable[[object], list[int]] | None = None):
        self._model_source = model
        # The tokens every prompt starts with (the system prompt, templated), given
        # the tokenizer: their keys and values are computed once and copied in.
        self._shared_prefix = shared_prefix
        self.prefix: list[int] = []
        self.loaded: LoadedModel | None = None
        self.max_batch = max_batch
        self._max_tokens_setting = max_tokens
        self.max_tokens = max_tokens
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.cache: RaggedKVCache | None = None
        self.min_rows = 1  # measured on the engine thread: see _step
        self._ready = threading.Event()
        self._incoming: queue.Queue[_Request | None] = queue.Queue()
        self._active: list[_Request] = []  # row i of the cache belongs to _active[i]
        self._lengths: list[int] = []  # tokens in the cache per row
        self._last: list[int] = []  # the token each row feeds next
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._stopping = False
        self._start_error: Exception | None = None
        self.steps = 0

    @property
    def context_limit(self) -> int:
        """Most tokens (prompt plus reply) one request may hold."""
        return self.max_tokens

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

    def submit(self, prompt_ids: list[int], params: GenerationParams, on_text: Callable[[str], None],
               cancelled: threading.Event | None = None) -> Future:
        if self._stopping:
            raise RuntimeError("engine stopped")
        if not prompt_ids:
            raise ValueError("empty prompt")
        budget = min(params.max_new_tokens, self.max_tokens - len(prompt_ids))
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in {self.max_tokens}")
        req = _Request(list(prompt_ids), params, on_text, cancelled or threading.Event(), Future(),
                       IncrementalDecoder(self.loaded.tokenizer), budget=budget)
        self._incoming.put(req)
        return req.future

    def generate(self, prompt_ids: list[int], params: GenerationParams, on_text: Callable[[str], None],
                 cancelled: threading.Event | None = None) -> GenerationResult:
        """Submit and wait for the end."""
        return self.submit(prompt_ids, params, on_text, cancelled).result()

    # --- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._setup()
        except Exception as exc:
            logger.exception("Engine could not start")
            self._stopping, self._start_error = True, exc
            return
        finally:
            self._ready.set()
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._admit()
                    if self._active:
                        self._step()
                except Exception as exc:
                    # A failed step fails every request in it; the engine keeps serving.
                    logger.exception("Engine step failed")
                    _fail(self._active, exc)
                    self._active, self._lengths, self._last = [], [], []
        waiting = []
        while not self._incoming.empty():
            waiting.append(self._incoming.get_nowait())
        _fail([r for r in self._active + waiting if r is not None], RuntimeError("engine stopped"))

    def _setup(self) -> None:
        lm = self.loaded = _take(self._model_source)
        lm.model.set_attn_implementation("ragged")
        cfg = lm.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_heads = cfg.num_key_value_heads
        self.max_tokens = min(self._max_tokens_setting, lm.context_len)
        self.min_rows = invariant_rows(lm.model, self.max_batch)
        slots = max(self.max_batch, self.min_rows)
        # One more slot keeps the shared prefix's keys and values.
        self.cache = RaggedKVCache(cfg.num_hidden_layers, slots + 1, cfg.num_key_value_heads,
                                   head_dim, self.max_tokens, lm.dtype, lm.device)
        self._prefix_slot = slots
        prefix = self._shared_prefix(lm.tokenizer) if self._shared_prefix else []
        if 0 < len(prefix) < self.max_tokens // 2:
            self._forward_prompt([prefix], self._prefix_slot, 0)
            self.prefix = list(prefix)
        logger.info("Engine: %d slots; a step computes at least %d rows (fewer round differently here)",
                    self.max_batch, self.min_rows)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, together, within a token budget per step."""
        joining: list[_Request] = []
        spent = 0
        while len(self._active) + len(joining) < self.max_batch and spent < self.prefill_tokens_per_step:
            try:
                req = self._incoming.get(block=not self._active and not joining)
            except queue.Empty:
                break
            if req is None:
                break
            if req.cancelled.is_set():
                self._finish_unstarted(req)
                continue
            spent += len(req.prompt_ids)
            joining.append(req)
        # Prompts of one length share a forward pass. Padding a shorter prompt to a
        # longer one changes its numerics in bfloat16, and with them greedy output.
        # A prompt that starts with the shared prefix always computes only the rest,
        # alone or not, so its arithmetic never depends on its neighbours either.
        by_shape: dict[tuple[int, int], list[_Request]] = {}
        for req in joining:
            by_shape.setdefault((self._cached_prefix_len(req.prompt_ids), len(req.prompt_ids)), []).append(req)
        for group in by_shape.values():
            try:
                self._prefill(group)
            except Exception as exc:
                # Not yet (or only partly) in the batch: fail them here, or their callers wait forever.
                logger.exception("Prefill failed")
                _fail(group, exc)
                self._retire()

    def _cached_prefix_len(self, prompt_ids: list[int]) -> int:
        n = len(self.prefix)
        return n if n and len(prompt_ids) > n and prompt_ids[:n] == self.prefix else 0

    def _forward_prompt(self, prompts: list[list[int]], first_row: int, start: int) -> torch.Tensor:
        """Prompt tokens from position ``start`` on into rows ``first_row``..., over what the rows hold before it."""
        lm = self.loaded
        dev = lm.device
        width = len(prompts[0]) - start
        ids = torch.tensor([p[start:] for p in prompts], device=dev)
        pos = torch.arange(start, start + width, device=dev)
        mask = (torch.arange(start + width, device=dev)[None, :] <= pos[:, None])[None, None]
        self.cache.for_prefill(torch.arange(first_row, first_row + len(prompts), device=dev), width, start)
        out = lm.model(input_ids=ids, position_ids=pos[None].expand(len(prompts), -1),
                       attention_mask=mask.expand(len(prompts), 1, width, start + width),
                       past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def _prefill(self, joining: list[_Request]) -> None:
        """One forward pass over new prompts of equal length; each one's last position gives its first token."""
        first_row = len(self._active)
        start = self._cached_prefix_len(joining[0].prompt_ids)  # the same for the whole group
        if start:
            for row in range(first_row, first_row + len(joining)):
                self.cache.move(self._prefix_slot, row, start)
        logits = self._forward_prompt([r.prompt_ids for r in joining], first_row, start)
        tokens = self._sample(logits, joining).tolist()
        for req, token in zip(joining, tokens):
            self._active.append(req)
            self._lengths.append(len(req.prompt_ids))
            self._last.append(token)
            self._accept(len(self._active) - 1, token)
        self._retire()

    def _span(self, length: int) -> int:
        """Positions a row attends over once its next token is in: its length rounded up to a bucket."""
        return min(-(-(length + 1) // SPAN_BUCKET) * SPAN_BUCKET, self.max_tokens)

    def _order_rows(self) -> list[int]:
        """Keep rows in decreasing order of span, so that each span bucket is one range of rows; their spans.

        A row that outgrows its bucket swaps places with the first row of a
        smaller span: two rows of the cache copied, once per bucket crossed.
        """
        spans = [self._span(n) for n in self._lengths]
        i = 1
        while i < len(spans):
            if spans[i] <= spans[i - 1]:
                i += 1
                continue
            j = next(r for r in range(i) if spans[r] < spans[i])
            self.cache.swap(i, j, max(self._lengths[i], self._lengths[j]))
            for rows in (self._active, self._lengths, self._last, spans):
                rows[i], rows[j] = rows[j], rows[i]
            i = max(j, 1)
        return spans

    def _step(self) -> None:
        lm = self.loaded
        dev = lm.device
        spans = self._order_rows()
        lengths, last = self._lengths, self._last
        if len(lengths) < self.min_rows:
            # Matrix products over few rows may take another kernel and round
            # differently (oneDNN over one bfloat16 row, MKL over up to three
            # float32 rows), which would make a lone request's greedy text differ
            # from the same request in a batch. Throw-away copies of row 0 in free
            # slots keep every step at the measured minimum.
            pad = self.min_rows - len(lengths)
            lengths, last, spans = lengths + lengths[:1] * pad, last + last[:1] * pad, spans + spans[:1] * pad
        positions = torch.tensor(lengths, device=dev)
        span = spans[0]
        self.cache.for_decode(positions, span)
        mask = (torch.arange(span, device=dev)[None, :] <= positions[:, None])[:, None, None, :]
        # Per row and key-value head, the additive mask ragged_attention takes.
        bias = torch.zeros(mask.shape, dtype=lm.dtype, device=dev).masked_fill_(~mask, float("-inf"))
        kv = self._kv_heads
        bias = bias.view(len(lengths), 1, span).repeat_interleave(kv, dim=0)
        groups, start = [], 0
        for stop in range(1, len(spans) + 1):
            if stop == len(spans) or spans[stop] != spans[start]:
                groups.append((start, stop, spans[start], bias[start * kv:stop * kv, :, :spans[start]]))
                start = stop
        out = lm.model(input_ids=torch.tensor(last, device=dev)[:, None], position_ids=positions[:, None],
                       attention_mask=mask, past_key_values=self.cache, use_cache=True, ragged_groups=groups)
        tokens = self._sample(out.logits[:len(self._active), -1], self._active).tolist()
        self.steps += 1
        for row, token in enumerate(tokens):
            self._lengths[row] += 1
            self._last[row] = token
            self._accept(row, token)
        self._retire()

    def _sample(self, logits: torch.Tensor, reqs: list[_Request]) -> torch.Tensor:
        greedy = torch.argmax(logits, dim=-1)
        temps = [r.params.temperature for r in reqs]
        if not any(t > 0 for t in temps):
            return greedy
        t = torch.tensor([max(x, 1e-6) for x in temps], device=logits.device)[:, None]
        sampled = torch.multinomial(torch.softmax(logits.float() / t, dim=-1), 1)[:, 0]
        return torch.where(t[:, 0] > 1e-6, sampled, greedy)

    def _accept(self, row: int, token: int) -> None:
        req = self._active[row]
        if req.first_token_s is None:
            req.first_token_s = time.monotonic() - req.submitted
        req.generated += 1
        if token in self.loaded.eos_ids:
            req.finish_reason = "stop"
            return
        req.emit(req.decoder.push(token))
        if req.generated >= req.budget:
            req.finish_reason = "length"

    def _retire(self) -> None:
        """Finish requests that are done or cancelled; keep rows 0..n-1 packed."""
        row = 0
        while row < len(self._active):
            req = self._active[row]
            reason = req.finish_reason or ("cancelled" if req.cancelled.is_set() else None)
            if reason is None and not req.future.done():
                row += 1
                continue
            if not req.future.done():  # a failed request only leaves
                req.emit(req.decoder.flush())
                req.future.set_result(GenerationResult("".join(req.pieces), reason, len(req.prompt_ids),
                                                       req.generated, req.first_token_s))
            last = len(self._active) - 1
            if row != last:
                self.cache.move(last, row, self._lengths[last])
                self._active[row], self._lengths[row], self._last[row] = (
                    self._active[last], self._lengths[last], self._last[last])
            self._active.pop()
            self._lengths.pop()
            self._last.pop()

    def _finish_unstarted(self, req: _Request) -> None:
        req.future.set_result(GenerationResult("", "cancelled", len(req.prompt_ids), 0, None))


def _fail(reqs: list[_Request], exc: BaseException) -> None:
    for req in reqs:
        if not req.future.done():
            req.future.set_exception(exc)


class _TextStreamer:
    """A ``generate()`` streamer for one row: decodes each new token and passes the text on."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[str], None], eos_ids: frozenset[int]):
        self.decoder, self.emit, self.eos_ids = decoder, emit, eos_ids
        self.prompt_seen = False
        self.first_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        if self.first_at is None:
            self.first_at = time.monotonic()
        for token in value.reshape(-1).tolist():
            if token not in self.eos_ids:
                self.emit(self.decoder.push(token))

    def end(self) -> None:
        self.emit(self.decoder.flush())


class GenerateEngine:
    """The baseline: one ``model.generate()`` per request, one request at a time, on a thread of its own."""

    def __init__(self, model: ModelSource):
        self._model_source = model
        self.loaded: LoadedModel | None = None
        self.context_limit = 0
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="generate")

    def start(self) -> GenerateEngine:
        self.loaded = self._thread.submit(_take, self._model_source).result()
        self.context_limit = self.loaded.context_len
        return self

    def stop(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def generate(self, prompt_ids: list[int], params: GenerationParams, on_text: Callable[[str], None],
                 cancelled: threading.Event | None = None) -> GenerationResult:
        return self._thread.submit(self._generate, prompt_ids, params, on_text, cancelled).result()

    def _generate(self, prompt_ids: list[int], params: GenerationParams, on_text: Callable[[str], None],
                  cancelled: threading.Event | None) -> GenerationResult:
        from transformers import StoppingCriteria, StoppingCriteriaList

        lm = self.loaded
        cancelled = cancelled or threading.Event()

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=input_ids.device)

        pieces: list[str] = []

        def emit(piece: str) -> None:
            if piece:
                pieces.append(piece)
                on_text(piece)

        streamer = _TextStreamer(IncrementalDecoder(lm.tokenizer), emit, lm.eos_ids)
        budget = min(params.max_new_tokens, self.context_limit - len(prompt_ids))
        sample = params.temperature > 0
        with torch.inference_mode():
            started = time.monotonic()
            out = lm.model.generate(
                torch.tensor([prompt_ids], device=lm.device), attention_mask=torch.ones(1, len(prompt_ids),
                                                                                         dtype=torch.long,
                                                                                         device=lm.device),
                max_new_tokens=budget, do_sample=sample, temperature=params.temperature if sample else None,
                top_p=None, top_k=None, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancel()]),
                pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=sorted(lm.eos_ids))
        new = out[0, len(prompt_ids):].tolist()
        if cancelled.is_set():
            reason = "cancelled"
        elif new and new[-1] in lm.eos_ids:
            reason = "stop"
        else:
            reason = "length"
        first = streamer.first_at - started if streamer.first_at is not None else None
        return GenerationResult("".join(pieces), reason, len(prompt_ids), len(new), first)
