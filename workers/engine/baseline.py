"""The baseline engine: one ``model.generate()`` per request, one request at a time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from app.protocol import SamplingParams
from workers.engine.request import GenerationResult, IncrementalDecoder
from workers.engine.runner import ModelSource, take
from workers.model import LoadedModel


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
        self.loaded = self._thread.submit(take, self._model_source).result()
        self.context_limit = self.loaded.context_len
        return self

    def stop(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=True)

    def generate(self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cancelled: threading.Event | None = None) -> GenerationResult:
        return self._thread.submit(self._generate, prompt_ids, params, on_text, cancelled).result()

    def _generate(self, prompt_ids: list[int], params: SamplingParams, on_text: Callable[[str], None],
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
