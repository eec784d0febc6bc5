"""A request inside the engine: its prompt, its reply so far and the cache row it holds.

Pure Python (no torch): the scheduler moves these between waiting, filling
and decoding, and the runner reads their rows, lengths and last tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from app.protocol import SamplingParams


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None = None  # from submission
    cached_tokens: int = 0  # prompt tokens not computed: taken from the shared prefix or a kept earlier prompt
    admitted_s: float | None = None  # from submission to a cache row: a free slot, and the pass under way ended


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


@dataclass(eq=False)
class Request:
    """One request from submission to its result.

    While its prompt is computed (``filling``) it holds a free cache row and
    ``filled`` says how many prompt tokens are in it; once the prompt is in, it
    decodes in a row of its own, feeding back its last output token. The cache
    row holds every token but that last one: :attr:`length`.
    """

    prompt_ids: list[int]
    params: SamplingParams
    budget: int  # the most tokens it may add: its max_new_tokens, less where the cache has no room
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    row: int = -1  # the cache row it holds: -1 while waiting
    filled: int = 0  # prompt tokens in that row so far (reused or computed)
    origin: int = 0  # where the computation of its prompt's pieces starts: after the shared prefix, if it has it
    reused: int = 0  # prompt tokens it took from the shared prefix or a kept prompt, not computed
    keep_only: bool = False  # a finished turn's reply computed again to be kept: no token is generated
    output_ids: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    admitted_s: float | None = None
    finish_reason: str | None = None  # stop | length, once decided; a cancelled request leaves without one
    # The engine's side: where its text goes and where its result is awaited.
    on_text: Callable[[str], None] = lambda _: None
    future: Future = field(default_factory=Future)
    decoder: IncrementalDecoder | None = None
    pieces: list[str] = field(default_factory=list)

    @property
    def prompt_done(self) -> bool:
        return self.filled == len(self.prompt_ids)

    @property
    def length(self) -> int:
        """Tokens in its cache row."""
        if not self.output_ids:
            return self.filled
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def last_token(self) -> int:
        """The token its next decoding pass feeds."""
        return self.output_ids[-1]

    def append(self, token: int, eos_ids: frozenset[int]) -> None:
        """Take one generated token: the end of the reply at an end-of-sequence token or at its budget."""
        if self.first_token_s is None:
            self.first_token_s = time.monotonic() - self.submitted
        self.output_ids.append(token)
        if token in eos_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.budget:
            self.finish_reason = "length"

    def emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.on_text(piece)

    def result(self, reason: str) -> GenerationResult:
        return GenerationResult("".join(self.pieces), reason, len(self.prompt_ids), len(self.output_ids),
                                self.first_token_s, self.reused, self.admitted_s)
