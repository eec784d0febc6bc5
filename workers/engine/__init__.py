"""Generation engines: they decode requests and hand out text as it comes.

Engines know nothing of Celery or Redis. A caller submits token ids, its
:class:`~app.protocol.SamplingParams`, a callback for new text and a cancel
event, and waits for the result; the callback runs on the engine's thread and
must be quick.

- :class:`BatchingEngine` (``batching.py``) is the one workers use: one thread
  owns the model and computes every active request together, one token per
  request per forward pass, with new prompts computed in the same passes in
  pieces (chunked prefill) and requests leaving as soon as they finish
  (continuous batching). Its parts: ``request.py`` (a request: its prompt,
  reply, cache row and length), ``scheduler.py`` (pure Python: what each pass
  computes, as a named plan), ``runner.py`` (tensors, the forward pass,
  sampling), ``cache.py`` (KV memory).
- :class:`GenerateEngine` (``baseline.py``) is the baseline: one
  ``model.generate()`` call per request, one at a time.

Names are imported when first used, so that the pure-Python modules
(``request``, ``scheduler``) load without torch.
"""

from __future__ import annotations

import importlib

_WHERE = {"BatchingEngine": "batching", "GenerateEngine": "baseline", "GenerationResult": "request",
          "IncrementalDecoder": "request", "PREFILL_CHUNK": "scheduler", "SPAN_BUCKET": "scheduler",
          }

__all__ = [*sorted(_WHERE), "build_engine"]


def build_engine(settings, after_pass=lambda: None):
    """The engine a worker's settings ask for, started: its model loaded on the engine's own thread.

    ``after_pass`` runs on that thread once each pass's text is handed out.
    """
    from workers.engine.baseline import GenerateEngine
    from workers.engine.batching import BatchingEngine
    from workers.model import load_model
    from workers.prompt import shared_prefix_ids

    def load():  # on the engine's own thread: the one that runs the model
        return load_model(str(settings.model_dir), settings.device, settings.dtype, settings.torch_threads,
                          settings.max_batch if settings.prepack else 0, settings.fuse_projections, settings.quantize,
                          settings.float16_weights == "auto")

    if settings.engine == "batching":
        return BatchingEngine(load, settings.max_batch, settings.engine_max_tokens,
                              prefill_tokens_per_pass=settings.prefill_tokens_per_pass,
                              shared_prefix=lambda tok: shared_prefix_ids(tok, settings.system_prompt),
                              after_pass=after_pass, prefix_cache_mb=settings.prefix_cache_mb,
                              nice=settings.engine_nice).start()
    return GenerateEngine(load, after_pass=after_pass).start()


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
