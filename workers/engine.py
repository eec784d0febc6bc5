"""The generation engine: decodes a request step by step and hands out text as it comes.

It knows nothing of Celery or Redis: it takes a loaded model, and callbacks for
new text and for "stop now". This is a one-request-at-a-time decode loop with
the KV cache on; requests from several tasks are serialised by a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.model import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None = None


class IncrementalDecoder:
    """Turns token ids into text pieces whose concatenation is the decoded whole.

    A piece is held back while it ends in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            piece = text[len(self.emitted):]
            self.emitted = text
            return piece
        return ""


class Engine:
    """Runs requests on one loaded model, one at a time."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self._lock = threading.Lock()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: GenerationParams, on_text: Callable[[str], None],
                 should_stop: Callable[[], bool] = lambda: False) -> GenerationResult:
        """Decode until eos, ``max_new_tokens``, the context's end or ``should_stop()``."""
        lm = self.loaded
        budget = min(params.max_new_tokens, lm.context_len - len(prompt_ids))
        decoder = IncrementalDecoder(lm.tokenizer)
        pieces: list[str] = []
        generator = None
        if params.temperature > 0 and params.seed is not None:
            generator = torch.Generator(device=lm.device).manual_seed(params.seed)

        def emit(piece: str) -> None:
            if piece:
                pieces.append(piece)
                on_text(piece)

        with self._lock:
            started = time.monotonic()
            first_token_s = None
            finish = "length"
            count = 0
            input_ids = torch.tensor([prompt_ids], device=lm.device)
            past = None
            while count < budget:
                if should_stop():
                    finish = "cancelled"
                    break
                out = lm.model(input_ids=input_ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                token = _choose(logits, params.temperature, generator)
                if first_token_s is None:
                    first_token_s = time.monotonic() - started
                count += 1
                if token in lm.eos_ids:
                    finish = "stop"
                    break
                emit(decoder.push(token))
                input_ids = torch.tensor([[token]], device=lm.device)
            emit(decoder.flush())
        return GenerationResult("".join(pieces), finish, len(prompt_ids), count, first_token_s)


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
