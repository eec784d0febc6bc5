"""The model runner: tensors, the forward pass of a plan, and sampling.

What transformers ships and what is written here: the model's own modules
(embedding, norms, linear layers, activation) and SDPA (for pieces of
prompts, and for decoding rows in bfloat16) do the work. Decoding rows
attend through :func:`attend`. A model
whose Llama layers were fused (:mod:`workers.fusion`) runs them in
:class:`workers.fusion.LlamaPass`, the same operations without transformers'
forward around them; any other model runs through its own forward, with
:func:`ragged_attention` registered in transformers' ``AttentionInterface``
and logits only for the rows that need them (``logits_to_keep``).
transformers' own continuous batching (``init_continuous_batching``) applies
one generation config to every request (no per-request temperature) and its
paged cache was slower than a padded batch on CPU, so the scheduling and the
KV cache are ours (:mod:`workers.engine.scheduler`,
:mod:`workers.engine.cache`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from app.protocol import SamplingParams
from workers.engine.cache import RaggedKVCache
from workers.engine.scheduler import IDLE_PREFILL_TOKENS, PREFILL_CHUNK, CacheOp, DecodeRow, PromptPiece, span_of
from workers.fusion import LlamaPass
from workers.kernels import PassRows, RowRule, pad_linears
from workers.model import LoadedModel

logger = logging.getLogger(__name__)

# A layer that computes a pass's decoding rows apart from its prompts' rows (a kernel for few rows and one for many:
# :class:`workers.kernels.PaddedRows` with ``few``) computes prompts' rows at positions below this with them: a short
# prompt, as most first turns are, then adds no call of its own, and a long one's later rows go in calls of many.
FEW_POSITIONS = 64

# The real tokens of the start-up check that whole passes compute a row alike alone and beside others.
CHECK_TEXT = ("A request's greedy text must not depend on what else shares its batch. Each piece of this "
              "paragraph is computed in a row of its own, then decoded alone and beside the others, and the "
              "logits of every row are compared bit for bit, so that any operation which rounds differently "
              "by the number of rows it computes is found before the first request arrives.")


@dataclass(frozen=True)
class AttentionPlan:
    """How one forward pass's tokens attend, in the order of its tokens.

    First one token per decoding row: token i belongs to cache row i and
    attends over that row's first positions, in ``decode_groups`` of rows with
    one span (start, stop, span, additive bias). Then ``chunks`` of prompt
    tokens, each (offset in the pass, length, cache row, first position,
    causal mask over the row up to the chunk's end).
    """

    decode_groups: list[tuple[int, int, int, torch.Tensor]]
    chunks: list[tuple[int, int, int, int, torch.Tensor]]


def attend(module, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: AttentionPlan,
           scale: float) -> torch.Tensor:
    """Attention for a pass that mixes decoding rows and pieces of prompts; (tokens, heads, head dim).

    ``rows`` are the pass's queries (tokens, heads, head dim); ``key`` and
    ``value`` the layer's whole cache (:class:`RaggedKVCache`), this pass's
    keys and values already in. The pass is one sequence (batch of one) of
    every token it computes, so the linear layers read their weights once for
    decoding rows and new prompts together; only attention is split.

    A decoding row attends over its own length rounded up to a bucket
    (:func:`workers.engine.scheduler.span_of`), whatever its neighbours: one
    call over the batch's longest span would give a short row different
    rounding in bfloat16, and with it different greedy text. Rows of one
    bucket share a call; the scheduler keeps rows ordered by span, so each
    bucket is one range of rows, sliced from the cache without copies. The
    query heads that share a key head attend as that head's queries, so no
    key is repeated. In bfloat16 that is PyTorch's SDPA (its fused CPU
    kernel: 0.2x to 0.5x the time of two batched products and a softmax at
    one row; at 16 rows measured from 0.6x to 2x theirs, run to run and
    span to span; each row computed alike at any row count, given MKL's
    strict reproducible mode: see :mod:`workers`). In float32 (and on a GPU,
    whose SDPA kernels may split the positions by the batch's size) two
    batched matrix products and a float32 softmax do it: there SDPA took
    1.2x to 1.6x their time at 16 rows of 64 to 128 positions, and without
    MKL's strict mode it computed most rows differently alone than in a
    batch. A prompt's piece goes through transformers' SDPA attention over
    its own row, so its arithmetic depends on the prompt alone.
    """
    tokens, heads, dim = rows.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    out = rows.new_empty(tokens, heads, dim)
    fused = uses_sdpa(rows.dtype, rows.device)
    for start, stop, span, bias in plan.decode_groups:  # bias: 0 to attend, -inf beyond the row
        k, v = key[start:stop, :, :span], value[start:stop, :, :span]
        if fused:
            n = stop - start
            out[start:stop] = F.scaled_dot_product_attention(
                rows[start:stop].view(n, kv_heads, group, dim), k, v, attn_mask=bias, scale=scale).view(n, heads, dim)
            continue
        n = (stop - start) * kv_heads
        q = rows[start:stop].reshape(n, group, dim)
        scores = torch.baddbmm(bias, q, k.reshape(n, span, dim).transpose(1, 2), alpha=scale)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
        torch.bmm(probs, v.reshape(n, span, dim), out=out[start:stop].view(n, group, dim))
    for offset, length, row, first, causal in plan.chunks:
        stop = first + length
        piece, _ = sdpa_attention_forward(module, rows[offset:offset + length].transpose(0, 1)[None],
                                          key[row:row + 1, :, :stop], value[row:row + 1, :, :stop], causal,
                                          scaling=scale, dropout=0.0)
        out[offset:offset + length] = piece[0]
    return out


def uses_sdpa(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether decoding rows attend through SDPA (:func:`attend`): bfloat16 on a CPU."""
    return dtype == torch.bfloat16 and device.type == "cpu"


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     ragged_plan: AttentionPlan | None = None, **kwargs):
    """:func:`attend` as a transformers attention function, for models the runner drives through their forward.

    Without a plan (``generate()`` on the same model) this is plain SDPA.
    """
    if ragged_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attend(module, query[0].transpose(0, 1), key, value, ragged_plan, scale)[None], None


AttentionInterface.register("ragged", ragged_attention)
AttentionMaskInterface.register("ragged", sdpa_mask)


class ModelRunner:
    """Owns the model's tensors on the engine thread: the KV cache, forward passes and sampling.

    Built by :meth:`setup` on the thread that will run it. The cache has two
    rows beyond the batch slots: the shared prefix's keys and values
    (:attr:`prefix_row`), and a scratch row that the throw-away rows of a short
    pass write to.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int, max_tokens: int, prefill_tokens_per_pass: int):
        self.loaded = loaded
        self.max_batch = max_batch
        self.max_tokens = min(max_tokens, loaded.context_len)
        self.prefill_tokens_per_pass = prefill_tokens_per_pass
        self.vocab = loaded.model.get_input_embeddings().num_embeddings
        self.min_rows = 1  # measured by setup: see forward and least_pass_rows
        self.padded: dict[str, RowRule] = {}  # how each kind of linear layer is padded (pad_linears)
        self.pass_rows = PassRows()  # the rows of the pass under way that go with its decoding rows (FEW_POSITIONS)
        self.invariance_s = 0.0  # the time those two measurements took
        self.cache: RaggedKVCache | None = None
        self.lean: LlamaPass | None = None
        self.prefix_row, self.scratch_row = max_batch, max_batch + 1

    def setup(self) -> None:
        lm = self.loaded
        lm.model.set_attn_implementation("ragged")
        cfg = lm.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self._kv_heads = cfg.num_key_value_heads
        # The most rows a pass computes: decoding rows and pieces of prompts, or pieces alone when none decodes.
        most = self.max_batch + max(self.prefill_tokens_per_pass, PREFILL_CHUNK, IDLE_PREFILL_TOKENS)
        started = time.monotonic()
        self.padded = pad_linears(lm.model, self.max_batch, most, head=lm.model.get_output_embeddings(),
                                  pass_rows=self.pass_rows)
        # Fused Llama layers run in a lean pass of their own; any other model through its forward.
        self.lean = LlamaPass.of(lm.model, self.max_tokens)
        self.cache = RaggedKVCache(cfg.num_hidden_layers, self.max_batch + 2, cfg.num_key_value_heads,
                                   head_dim, self.max_tokens, lm.dtype, lm.device)
        self.bytes_per_token = RaggedKVCache.bytes_per_token(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                             head_dim, lm.dtype)
        # A 4-D mask is used as given: ragged_attention masks by its plan instead.
        self._no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=lm.device)
        self.min_rows = self.least_pass_rows()
        self.invariance_s = time.monotonic() - started

    def fill_prefix(self, prefix: list[int]) -> bool:
        """Compute the shared prefix into its row, where there is room; whether it was."""
        if not 0 < len(prefix) < self.max_tokens // 2:
            return False
        self.forward([], [PromptPiece(prefix, self.prefix_row, first, min(PREFILL_CHUNK, len(prefix) - first), False)
                          for first in range(0, len(prefix), PREFILL_CHUNK)])
        return True

    def apply(self, ops: Sequence[CacheOp]) -> None:
        for op in ops:
            self.cache.apply(op)

    def least_pass_rows(self) -> int:
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
            if self.passes_alike():
                return rows
        logger.error("Whole passes gave a row different logits alone and in a batch at every padding up to %d rows: "
                     "greedy text may depend on the batch", self.max_batch)
        return self.max_batch

    def passes_alike(self) -> bool:
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
        rows = [DecodeRow(length, text[i + length], span_of(length, self.max_tokens))
                for i, length in enumerate(lengths)]
        prefilled = [self.forward([], [PromptPiece(p, row, 0, len(p), True)])[0] for row, p in enumerate(prompts)]
        together = self.forward(rows, [])[:n]
        alike = True
        for row in range(n):
            if row:  # a lone decoding row is cache row 0
                self.cache.swap(0, row, max(lengths) + 1)
            alike &= torch.equal(self.forward(rows[row:row + 1], [])[0], together[row])
            if row:
                self.cache.swap(0, row, max(lengths) + 1)
        beside = self.forward(rows[:-1], [PromptPiece(prompts[-1], n - 1, 0, lengths[-1], True)])
        return alike and torch.equal(beside[:n - 1], together[:n - 1]) and torch.equal(beside[n - 1], prefilled[-1])

    def forward(self, decoding: list[DecodeRow], pieces: list[PromptPiece]) -> torch.Tensor:
        """One forward pass; the logits of each decoding row, then of each piece that is its prompt's ``last``.

        ``decoding`` are cache rows 0, 1, ... in order.
        """
        lm = self.loaded
        dev = lm.device
        tokens, rows, positions = [], [], []
        keep = list(range(len(decoding)))  # the positions whose logits are wanted: not the throw-away rows'
        for row, d in enumerate(decoding):
            tokens.append(d.token), rows.append(row), positions.append(d.length)
        piece_tokens = sum(p.length for p in pieces)
        if len(decoding) + piece_tokens < self.min_rows:
            # Matrix products over few rows may take another kernel and round
            # differently (oneDNN over one bfloat16 row, MKL over a few float32
            # rows), which would make a lone request's greedy text differ from
            # the same request in a batch. Throw-away rows (copies of the first
            # decoding row, written to the scratch row) keep every pass at the
            # measured minimum.
            template = decoding[0] if decoding else DecodeRow(0, pieces[0].tokens[0], span_of(0, self.max_tokens))
            pad = self.min_rows - len(decoding) - piece_tokens
            decoding = decoding + [template] * pad
            tokens += [template.token] * pad
            rows += [self.scratch_row] * pad
            positions += [template.length] * pad
        # Each piece's tokens at positions below FEW_POSITIONS first, with the decoding rows; then the later ones.
        cuts = [min(piece.length, max(0, FEW_POSITIONS - piece.first)) for piece in pieces]
        spans = [(i, piece.first, cut) for i, (piece, cut) in enumerate(zip(pieces, cuts)) if cut]
        spans += [(i, piece.first + cut, piece.length - cut) for i, (piece, cut) in enumerate(zip(pieces, cuts))
                  if cut < piece.length]
        self.pass_rows.few = len(tokens) + sum(cuts)
        chunks, ends = [], {}
        for i, first, length in spans:
            piece, stop = pieces[i], first + length
            # Each of the piece's tokens attends over its row up to itself; built once for every layer.
            causal = torch.arange(stop, device=dev)[None, :] <= torch.arange(first, stop, device=dev)[:, None]
            chunks.append((len(tokens), length, piece.row, first, causal[None, None]))
            tokens += piece.tokens[first:stop]
            rows += [piece.row] * length
            positions += range(first, stop)
            ends[i] = len(tokens) - 1  # the piece's last token: its later span comes after its early one
        keep += [ends[i] for i, piece in enumerate(pieces) if piece.last]
        keep += keep[:1] * (self.min_rows - len(keep))  # the vocabulary projection is a matrix product too
        self.cache.plan(torch.tensor(rows, device=dev), torch.tensor(positions, device=dev))
        plan = AttentionPlan(self._decode_groups(decoding), chunks)
        ids = torch.tensor(tokens, device=dev)
        pos = torch.tensor(positions, device=dev)
        keep = torch.tensor(keep or [0], device=dev)
        try:
            if self.lean is not None:
                cache = self.cache
                return self.lean(ids, pos, cache.write, lambda layer, module, queries: attend(
                    module, queries, cache.keys[layer], cache.values[layer], plan, module.scaling), keep)
            out = lm.model(input_ids=ids[None], position_ids=pos[None], attention_mask=self._no_mask,
                           cache=self.cache, use_cache=True, ragged_plan=plan, logits_to_keep=keep)
            return out.logits[0]
        finally:
            self.pass_rows.few = 0  # generate() on the same model: every row a prompt's

    def _decode_groups(self, decoding: list[DecodeRow]) -> list[tuple[int, int, int, torch.Tensor]]:
        """Ranges of decoding rows with one span, each with the additive mask ragged_attention takes."""
        if not decoding:
            return []
        lm = self.loaded
        dev = lm.device
        lengths = torch.tensor([d.length for d in decoding], device=dev)
        spans = [d.span for d in decoding]
        span = max(spans)
        allowed = torch.arange(span, device=dev)[None, :] <= lengths[:, None]
        bias = torch.zeros(allowed.shape, dtype=lm.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        if uses_sdpa(lm.dtype, dev):  # SDPA's mask: (rows, 1, 1, span), the same for every head
            bias, kv = bias.view(len(decoding), 1, 1, span), 1
        else:  # baddbmm's: (rows * key heads, 1, span)
            kv = self._kv_heads
            bias = bias.view(len(decoding), 1, span).repeat_interleave(kv, dim=0)
        groups, start = [], 0
        for stop in range(1, len(spans) + 1):
            if stop == len(spans) or spans[stop] != spans[start]:
                groups.append((start, stop, spans[start], bias[start * kv:stop * kv, ..., :spans[start]]))
                start = stop
        return groups

    def sample(self, logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
        """One token per row of ``logits``: greedy, or drawn at the row's temperature."""
        greedy = torch.argmax(logits, dim=-1)
        temps = [p.temperature for p in params]
        if not any(t > 0 for t in temps):
            return greedy.tolist()
        t = torch.tensor([max(x, 1e-6) for x in temps], device=logits.device)[:, None]
        sampled = torch.multinomial(torch.softmax(logits.float() / t, dim=-1), 1)[:, 0]
        return torch.where(t[:, 0] > 1e-6, sampled, greedy).tolist()


ModelSource = LoadedModel | Callable[[], LoadedModel]


def take(model: ModelSource) -> LoadedModel:
    """The model itself, loading it here (on the calling thread) when given a loader."""
    return model() if callable(model) else model
