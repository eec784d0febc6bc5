"""Generation engines: they decode requests and hand out text as it comes.

Engines know nothing of Celery or Redis. A caller submits token ids, sampling
parameters, a callback for new text and a cancel event, and waits for the
result; the callback runs on the engine's thread and must be quick.

- :class:`BatchingEngine` is the one workers use: one thread owns the model
  and computes every active request together, one token per request per
  forward pass. New prompts are computed in the same passes, in pieces
  (chunked prefill), and requests leave as soon as they finish or are
  cancelled (continuous batching).
- :class:`GenerateEngine` is the baseline: one ``model.generate()`` call per
  request, one at a time.

What transformers ships and what is written here: the model's own modules
(embedding, norms, linear layers, activation) and SDPA (for pieces of
prompts) do the work. Decoding rows attend through :func:`attend`. A model
whose Llama layers were fused (:mod:`workers.fusion`) runs them in
:class:`workers.fusion.LlamaPass`, the same operations without transformers'
forward around them; any other model runs through its own forward, with
:func:`ragged_attention` registered in transformers' ``AttentionInterface``
and logits only for the rows that need them (``logits_to_keep``). transformers' own
continuous batching (``init_continuous_batching``) applies one generation
config to every request (no per-request temperature) and its paged cache was
slower than a padded batch on CPU, so the scheduling and the KV cache are
ours: :class:`RaggedKVCache` is preallocated once, one row per batch slot, and
each row keeps its own length, so requests of any length share a pass without
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

from workers.fusion import LlamaPass
from workers.kernels import pad_linears
from workers.model import LoadedModel

logger = logging.getLogger(__name__)

# A decoding row attends over its length rounded up to this many positions:
# fewer wasted positions against more groups per pass (64 measured best here).
SPAN_BUCKET = 64
# A prompt is computed in pieces of this many tokens, cut at fixed places.
PREFILL_CHUNK = 128
# The real tokens of the start-up check that whole passes compute a row alike alone and beside others.
CHECK_TEXT = ("A request's greedy text must not depend on what else shares its batch. Each piece of this "
              "paragraph is computed in a row of its own, then decoded alone and beside the others, and the "
              "logits of every row are compared bit for bit, so that any operation which rounds differently "
              "by the number of rows it computes is found before the first request arrives.")


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
    slot: int = -1  # the cache row it fills while its prompt is computed
    filled: int = 0  # prompt tokens in that row so far

    def emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.on_text(piece)


@dataclass(frozen=True)
class PassPlan:
    """How one forward pass's tokens attend, in the order of its tokens.

    First one token per decoding row: token i belongs to cache row i and
    attends over that row's first positions, in ``decode_groups`` of rows with
    one span (start, stop, span, additive bias). Then ``chunks`` of prompt
    tokens, each (offset in the pass, length, cache row, first position,
    causal mask over the row up to the chunk's end).
    """

    decode_groups: list[tuple[int, int, int, torch.Tensor]]
    chunks: list[tuple[int, int, int, int, torch.Tensor]]


def attend(module, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: PassPlan,
           scale: float) -> torch.Tensor:
    """Attention for a pass that mixes decoding rows and pieces of prompts; (tokens, heads, head dim).

    ``rows`` are the pass's queries (tokens, heads, head dim); ``key`` and
    ``value`` the layer's whole cache (:class:`RaggedKVCache`), this pass's
    keys and values already in. The pass is one sequence (batch of one) of
    every token it computes, so the linear layers read their weights once for
    decoding rows and new prompts together; only attention is split.

    A decoding row attends over its own length rounded up to a bucket
    (:data:`SPAN_BUCKET`), whatever its neighbours: one call over the batch's
    longest span would give a short row different rounding in bfloat16, and
    with it different greedy text. Rows of one bucket share a call; the engine
    keeps rows ordered by span, so each bucket is one range of rows, sliced
    from the cache without copies. For one query token two batched matrix
    products and a float32 softmax run several times faster on CPU than SDPA
    with a mask. A prompt's piece goes through transformers' SDPA attention
    over its own row, so its arithmetic depends on the prompt alone.
    """
    tokens, heads, dim = rows.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = rows.new_empty(tokens, heads, dim)
    for start, stop, span, bias in plan.decode_groups:
        n = (stop - start) * kv_heads
        q = rows[start:stop].reshape(n, group, dim)
        k = key[start:stop, :, :span].reshape(n, span, dim)
        v = value[start:stop, :, :span].reshape(n, span, dim)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)  # bias: 0 to attend, -inf beyond the row
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        torch.bmm(probs, v, out=out[start:stop].view(n, group, dim))
    for offset, length, row, first, causal in plan.chunks:
        stop = first + length
        piece, _ = sdpa_attention_forward(module, rows[offset:offset + length].transpose(0, 1)[None],
                                          key[row:row + 1, :, :stop], value[row:row + 1, :, :stop], causal,
                                          scaling=scale, dropout=0.0)
        out[offset:offset + length] = piece[0]
    return out


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     ragged_plan: PassPlan | None = None, **kwargs):
    """:func:`attend` as a transformers attention function, for models the engine runs through their forward.

    Without a plan (``generate()`` on the same model) this is plain SDPA.
    """
    if ragged_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(module, query[0].transpose(0, 1), key, value, ragged_plan, scale)[None], None


AttentionInterface.register("ragged", ragged_attention)
AttentionMaskInterface.register("ragged", sdpa_mask)


class RaggedKVCache:
    """Preallocated keys and values, one row per batch slot, each row with its own length.

    The model calls :meth:`update` once per layer per forward pass; before each
    pass the engine says, per token, which row and position its key goes to.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._head_offsets = torch.arange(kv_heads, device=device)[None, :] * max_tokens
        self._flat = torch.zeros(0, dtype=torch.long, device=device)

    def plan(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Token i of the next pass goes to row ``rows[i]`` at position ``positions[i]``."""
        # Where each token's and head's key goes in a layer's cache seen as (slots * heads * tokens, dim):
        # one index_copy_ per layer writes the whole pass.
        _, heads, tokens, _ = self.keys[0].shape
        self._flat = ((rows * heads * tokens + positions)[:, None] + self._head_offsets).reshape(-1)

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store a layer's keys and values of the pass, each (tokens, heads, dim), where :meth:`plan` said."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        dim = k.shape[-1]
        k.view(-1, dim).index_copy_(0, self._flat, key.reshape(-1, dim))
        v.view(-1, dim).index_copy_(0, self._flat, value.reshape(-1, dim))

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The transformers cache interface: key and value (1, heads, tokens, dim); returns the whole cache."""
        self.write(layer_idx, key[0].transpose(0, 1), value[0].transpose(0, 1))
        # The whole cache: ragged_attention slices each row's positions itself.
        return self.keys[layer_idx], self.values[layer_idx]

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

    Each forward pass computes one token for every decoding request and, in
    the same pass, pieces of new prompts (chunked prefill): on this model a
    pass costs mostly one read of the weights, so a new prompt rides along
    with the decoding rows instead of stopping them for a pass of its own.
    A prompt is cut into pieces of :data:`PREFILL_CHUNK` tokens at fixed
    places, and a pass takes pieces up to ``prefill_tokens_per_pass`` tokens,
    so a long prompt delays the others' next token by a bounded amount.

    Give it a loader rather than a loaded model to load on that thread: with
    torch's OpenMP, a model step ran up to twice as slow on a thread other
    than the first one in the process to do torch work.
    """

    def __init__(self, model: ModelSource, max_batch: int = 16, max_tokens: int = 2048,
                 prefill_tokens_per_pass: int = 256, shared_prefix: Callable[[object], list[int]] | None = None,
                 after_pass: Callable[[], None] = lambda: None):
        self._model_source = model
        self._after_pass = after_pass  # called on the engine thread once a pass's text is handed out
        # The tokens every prompt starts with (the system prompt, templated), given
        # the tokenizer: their keys and values are computed once and copied in.
        self._shared_prefix = shared_prefix
        self.prefix: list[int] = []
        self.loaded: LoadedModel | None = None
        self.max_batch = max_batch
        self._max_tokens_setting = max_tokens
        self.max_tokens = max_tokens
        self.prefill_tokens_per_pass = max(prefill_tokens_per_pass, 1)
        self.cache: RaggedKVCache | None = None
        self.min_rows = 1  # measured on the engine thread: see _forward and _least_pass_rows
        self.padded: dict[str, int] = {}  # least rows of each kind of linear layer (pad_linears)
        self.invariance_s = 0.0  # the time those two measurements took at start
        self._vocab = 0
        self._ready = threading.Event()
        self._incoming: queue.Queue[_Request | None] = queue.Queue()
        self._active: list[_Request] = []  # decoding: row i of the cache belongs to _active[i]
        self._lengths: list[int] = []  # tokens in the cache per row
        self._last: list[int] = []  # the token each row feeds next
        self._filling: list[_Request] = []  # prompts being computed, first come first
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
        if min(prompt_ids) < 0 or max(prompt_ids) >= self._vocab:
            raise ValueError(f"token ids must be in 0..{self._vocab - 1}")
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
                    if self._active or self._filling:
                        self._step()
                        self._after_pass()
                except Exception as exc:
                    # A failed pass fails every request in it; the engine keeps serving.
                    logger.exception("Engine step failed")
                    _fail(self._active + self._filling, exc)
                    self._active, self._lengths, self._last, self._filling = [], [], [], []
        waiting = []
        while not self._incoming.empty():
            waiting.append(self._incoming.get_nowait())
        _fail([r for r in self._active + self._filling + waiting if r is not None], RuntimeError("engine stopped"))

    def _setup(self) -> None:
        lm = self.loaded = _take(self._model_source)
        lm.model.set_attn_implementation("ragged")
        cfg = lm.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_heads = cfg.num_key_value_heads
        self._vocab = lm.model.get_input_embeddings().num_embeddings
        self.max_tokens = min(self._max_tokens_setting, lm.context_len)
        most = self.max_batch + max(self.prefill_tokens_per_pass, PREFILL_CHUNK)  # the most rows a pass computes
        started = time.monotonic()
        self.padded = pad_linears(lm.model, self.max_batch, most, head=lm.model.get_output_embeddings())
        # Fused Llama layers run in a lean pass of their own; any other model through its forward.
        self._lean = LlamaPass.of(lm.model, self.max_tokens)
        self._slots = self.max_batch
        # Two more rows: the shared prefix's keys and values, and a scratch row
        # that the throw-away rows of a short pass write to.
        self.cache = RaggedKVCache(cfg.num_hidden_layers, self._slots + 2, cfg.num_key_value_heads,
                                   head_dim, self.max_tokens, lm.dtype, lm.device)
        self._prefix_slot, self._scratch_slot = self._slots, self._slots + 1
        # A 4-D mask is used as given: ragged_attention masks by its plan instead.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=lm.device)
        self.min_rows = self._least_pass_rows()
        self.invariance_s = time.monotonic() - started
        prefix = self._shared_prefix(lm.tokenizer) if self._shared_prefix else []
        if 0 < len(prefix) < self.max_tokens // 2:
            self._forward([], [(prefix, self._prefix_slot, first, min(PREFILL_CHUNK, len(prefix) - first))
                               for first in range(0, len(prefix), PREFILL_CHUNK)])
            self.prefix = list(prefix)
        padded = ", ".join(f"{kind} from {rows} rows" for kind, rows in self.padded.items() if rows > 1)
        logger.info("Engine: %d slots; %s; %s; whole passes give a row's logits alike alone and in a batch %s "
                    "(measured in %.1fs)", self.max_batch, "lean Llama pass" if self._lean else
                    "passes through the model's forward", f"linear layers padded: {padded}" if padded else
                    "no linear layer rounds by row count",
                    "unpadded" if self.min_rows == 1 else f"padded to {self.min_rows} rows", self.invariance_s)

    def _least_pass_rows(self) -> int:
        """The fewest rows to pad a pass to so that whole passes give every row's logits alike alone and beside others.

        :func:`workers.kernels.pad_linears` has padded the linear layers that
        round by row count; this checks the rest of a pass too (attention over
        groups of rows, norms, the vocabulary projection, whatever else the
        model runs). Should a pass still differ, it is padded with throw-away
        rows, to ever more of them until it does not.
        """
        counts = [1] + [n for n in (2, 4, 8, 16, 32, 64) if n < self.max_batch] + [self.max_batch]
        for rows in counts:
            self.min_rows = rows
            if self._passes_alike():
                return rows
        logger.error("Whole passes gave a row different logits alone and in a batch at every padding up to %d rows: "
                     "greedy text may depend on the batch", self.max_batch)
        return self.max_batch

    def _passes_alike(self) -> bool:
        """Whether real token rows get bit for bit the same logits alone as beside others, in decoding and in prompts.

        Pieces of :data:`CHECK_TEXT` of different lengths (spans of more than
        one bucket among them) fill one cache row each, in passes of their
        own. Then one pass decodes every row together, and each row is decoded
        alone; a last pass computes the last piece again beside the other rows
        decoding.
        """
        text = self.loaded.tokenizer.encode(CHECK_TEXT, add_special_tokens=False)
        n = min(self.max_batch, 8)
        lengths = [min(5 + 9 * (n - 1 - i), self.max_tokens - 2, PREFILL_CHUNK) for i in range(n)]  # longest first
        text = text * -(-(max(lengths) + n + 1) // len(text))
        prompts = [text[i:i + length] for i, length in enumerate(lengths)]
        rows = [(length, text[i + length], self._span(length)) for i, length in enumerate(lengths)]
        prefilled = [self._forward([], [(p, row, 0, len(p))])[0] for row, p in enumerate(prompts)]
        together = self._forward(rows, [])[:n]
        alike = True
        for row in range(n):
            if row:  # a lone decoding row is cache row 0
                self.cache.swap(0, row, max(lengths) + 1)
            alike &= torch.equal(self._forward(rows[row:row + 1], [])[0], together[row])
            if row:
                self.cache.swap(0, row, max(lengths) + 1)
        beside = self._forward(rows[:-1], [(prompts[-1], n - 1, 0, lengths[-1])])
        return alike and torch.equal(beside[:n - 1], together[:n - 1]) and torch.equal(beside[n - 1], prefilled[-1])

    def _admit(self) -> None:
        """Give waiting requests free rows; their prompts are computed by the coming passes."""
        while len(self._active) + len(self._filling) < self.max_batch:
            try:
                req = self._incoming.get(block=not self._active and not self._filling)
            except queue.Empty:
                break
            if req is None:
                break
            if req.cancelled.is_set():
                self._finish_unstarted(req)
                continue
            taken = {r.slot for r in self._filling}
            req.slot = next(s for s in range(len(self._active), self._slots) if s not in taken)
            # A prompt that starts with the shared prefix always computes only the rest,
            # alone or not, so its arithmetic never depends on its neighbours.
            req.filled = self._cached_prefix_len(req.prompt_ids)
            if req.filled:
                self.cache.move(self._prefix_slot, req.slot, req.filled)
            self._filling.append(req)

    def _cached_prefix_len(self, prompt_ids: list[int]) -> int:
        n = len(self.prefix)
        return n if n and len(prompt_ids) > n and prompt_ids[:n] == self.prefix else 0

    def _chunks(self) -> list[tuple[_Request, int, int]]:
        """Pieces of prompts for the next pass, first come first: (request, first position, length).

        A prompt is cut at fixed places (every :data:`PREFILL_CHUNK` tokens
        from where its computation starts), whatever else is waiting, so its
        arithmetic depends on the prompt alone. A pass takes at least one piece.
        """
        chunks, room = [], self.prefill_tokens_per_pass
        for req in self._filling:
            first = req.filled
            while first < len(req.prompt_ids):
                length = min(PREFILL_CHUNK, len(req.prompt_ids) - first)
                if chunks and length > room:
                    return chunks
                chunks.append((req, first, length))
                room -= length
                first += length
        return chunks

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
        """One pass: the next token of every decoding row, and pieces of waiting prompts."""
        for req in [r for r in self._filling if r.cancelled.is_set()]:
            self._filling.remove(req)
            self._finish_unstarted(req)
        spans = self._order_rows()
        chunks = self._chunks()
        if not self._active and not chunks:
            return
        pieces = [(r.prompt_ids, r.slot, first, length) for r, first, length in chunks]
        logits = self._forward(list(zip(self._lengths, self._last, spans)), pieces)
        self.steps += 1
        rows = len(self._active)
        done = []  # requests whose whole prompt is now in: their first token comes from this pass
        for req, first, length in chunks:
            req.filled = first + length
            if req.filled == len(req.prompt_ids):
                done.append(req)
        tokens = self._sample(logits[:rows + len(done)], self._active + done).tolist()
        for row, token in enumerate(tokens[:rows]):
            self._lengths[row] += 1
            self._last[row] = token
            self._accept(row, token)
        for req, token in zip(done, tokens[rows:]):
            self._start_decoding(req, token)
        self._retire()

    def _start_decoding(self, req: _Request, token: int) -> None:
        """A request whose prompt is in takes the next decoding row (rows stay packed from 0)."""
        self._filling.remove(req)
        row = len(self._active)
        if req.slot != row:
            other = next((r for r in self._filling if r.slot == row), None)
            if other is None:
                self.cache.move(req.slot, row, len(req.prompt_ids))
            else:
                self.cache.swap(req.slot, row, max(len(req.prompt_ids), other.filled))
                other.slot = req.slot
            req.slot = row
        self._active.append(req)
        self._lengths.append(len(req.prompt_ids))
        self._last.append(token)
        self._accept(row, token)

    def _forward(self, decoding: list[tuple[int, int, int]], pieces: list[tuple[list[int], int, int, int]]
                 ) -> torch.Tensor:
        """One forward pass; the logits of each decoding row, then of each prompt whose last piece this is.

        ``decoding``: (length, token, span) of cache rows 0, 1, ... in order;
        ``pieces``: (prompt, cache row, first position, length).
        """
        lm = self.loaded
        dev = lm.device
        tokens, rows, positions = [], [], []
        keep = list(range(len(decoding)))  # the positions whose logits are wanted: not the throw-away rows'
        for row, (length, token, _) in enumerate(decoding):
            tokens.append(token), rows.append(row), positions.append(length)
        piece_tokens = sum(length for *_, length in pieces)
        if len(decoding) + piece_tokens < self.min_rows:
            # Matrix products over few rows may take another kernel and round
            # differently (oneDNN over one bfloat16 row, MKL over a few float32
            # rows), which would make a lone request's greedy text differ from
            # the same request in a batch. Throw-away rows (copies of the first
            # decoding row, written to the scratch row) keep every pass at the
            # measured minimum.
            template = decoding[0] if decoding else (0, pieces[0][0][0], self._span(0))
            pad = self.min_rows - len(decoding) - piece_tokens
            decoding = decoding + [template] * pad
            tokens += [template[1]] * pad
            rows += [self._scratch_slot] * pad
            positions += [template[0]] * pad
        chunks = []
        for prompt, row, first, length in pieces:
            stop = first + length
            # Each of the piece's tokens attends over its row up to itself; built once for every layer.
            causal = torch.arange(stop, device=dev)[None, :] <= torch.arange(first, stop, device=dev)[:, None]
            chunks.append((len(tokens), length, row, first, causal[None, None]))
            tokens += prompt[first:stop]
            rows += [row] * length
            positions += range(first, stop)
            if stop == len(prompt):
                keep.append(len(tokens) - 1)
        keep += keep[:1] * (self.min_rows - len(keep))  # the vocabulary projection is a matrix product too
        self.cache.plan(torch.tensor(rows, device=dev), torch.tensor(positions, device=dev))
        plan = PassPlan(self._decode_groups(decoding), chunks)
        ids = torch.tensor(tokens, device=dev)
        pos = torch.tensor(positions, device=dev)
        keep = torch.tensor(keep or [0], device=dev)
        if self._lean is not None:
            cache = self.cache
            return self._lean(ids, pos, cache.write, lambda layer, module, queries: attend(
                module, queries, cache.keys[layer], cache.values[layer], plan, module.scaling), keep)
        out = lm.model(input_ids=ids[None], position_ids=pos[None], attention_mask=self._no_mask, cache=self.cache,
                       use_cache=True, ragged_plan=plan, logits_to_keep=keep)
        return out.logits[0]

    def _decode_groups(self, decoding: list[tuple[int, int, int]]) -> list[tuple[int, int, int, torch.Tensor]]:
        """Ranges of decoding rows with one span, each with the additive mask ragged_attention takes."""
        if not decoding:
            return []
        lm = self.loaded
        dev = lm.device
        lengths = torch.tensor([d[0] for d in decoding], device=dev)
        spans = [d[2] for d in decoding]
        span = max(spans)
        allowed = torch.arange(span, device=dev)[None, :] <= lengths[:, None]
        bias = torch.zeros(allowed.shape, dtype=lm.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        kv = self._kv_heads
        bias = bias.view(len(decoding), 1, span).repeat_interleave(kv, dim=0)
        groups, start = [], 0
        for stop in range(1, len(spans) + 1):
            if stop == len(spans) or spans[stop] != spans[start]:
                groups.append((start, stop, spans[start], bias[start * kv:stop * kv, :, :spans[start]]))
                start = stop
        return groups

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

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[str], None], eos_ids: frozenset[int],
                 after_pass: Callable[[], None]):
        self.decoder, self.emit, self.eos_ids, self.after_pass = decoder, emit, eos_ids, after_pass
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
        self.after_pass()

    def end(self) -> None:
        self.emit(self.decoder.flush())


class GenerateEngine:
    """The baseline: one ``model.generate()`` per request, one request at a time, on a thread of its own."""

    def __init__(self, model: ModelSource, after_pass: Callable[[], None] = lambda: None):
        self._model_source = model
        self._after_pass = after_pass  # called once each token's text is handed out
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

        streamer = _TextStreamer(IncrementalDecoder(lm.tokenizer), emit, lm.eos_ids, self._after_pass)
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
