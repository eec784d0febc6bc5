"""In-process measurements for the benchmark, each run in a fresh process and printed as JSON:

    python -m scripts.bench_probe gauge     # raw forward pass at batch 1 and 16
    python -m scripts.bench_probe generate  # one generate() per request, alone
    python -m scripts.bench_probe engine    # the batching engine alone, no stack

Each runs in a process of its own so that no other torch thread team shares the cores.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from config.settings import DEFAULT_MODEL_DIR, Settings
from scripts.loadgen import PROMPTS
from workers.engine import BatchingEngine, GenerateEngine, GenerationParams
from workers.cpu import NATIVE_BF16, cpu_flags
from workers.model import load_model
from workers.prompt import build_prompt_ids, shared_prefix_ids

SYSTEM = Settings().system_prompt  # what the workers use
NEW_TOKENS = 64


def prompts(loaded) -> list[list[int]]:
    return [build_prompt_ids(loaded.tokenizer, SYSTEM, [{"role": "user", "content": p}], 1000) for p in PROMPTS]


def _synced(device: torch.device) -> float:
    """perf_counter once the device has done its queued work (a GPU runs ahead of the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def raw_step(loaded, batch: int, prompt_len: int = 40, steps: int = 48) -> float:
    """Median seconds of one bare decode step (model forward with a KV cache, greedy), no stack."""
    model = loaded.model
    with torch.inference_mode():
        ids = torch.randint(100, 5000, (batch, prompt_len), device=loaded.device)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t = _synced(loaded.device)
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(_synced(loaded.device) - t)
    return statistics.median(times)


def timed(engine, ids: list[int]) -> tuple[float, list[float], int]:
    """(time to first text, gaps between texts, tokens) of one request alone."""
    stamps: list[float] = []
    started = time.perf_counter()
    result = engine.generate(ids, GenerationParams(NEW_TOKENS), lambda _: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - started, gaps, result.completion_tokens


def lone(engine, all_ids: list[list[int]]) -> dict:
    timed(engine, all_ids[0])  # warm-up
    ttft, gaps = [], []
    for ids in all_ids:
        first, g, _ = timed(engine, ids)
        ttft.append(first)
        gaps += g
    return {"ttft_ms": 1000 * statistics.median(ttft), "itl_ms": 1000 * statistics.median(gaps)}


def loader(threads: int, fuse: bool = True):
    return lambda: load_model(str(DEFAULT_MODEL_DIR), torch_threads=threads, fuse=fuse)


def gauge(threads: int) -> dict:
    loaded = loader(threads)()  # loaded on this thread, which runs the steps
    raw_step(loaded, 1, steps=8)  # warm-up
    # The best of three medians: the most this machine gives, through its noise.
    step1 = min(raw_step(loaded, 1) for _ in range(3))
    step16 = min(raw_step(loaded, 16) for _ in range(3))
    return {
        "device": torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": sorted(cpu_flags() & NATIVE_BF16),
        "dtype": str(loaded.dtype).removeprefix("torch."), "dtype_reason": loaded.dtype_reason,
        "kernels": loaded.kernels, "torch_threads": torch.get_num_threads(),
        "raw_step1_ms": 1000 * step1, "raw_tps1": 1 / step1,
        "raw_step16_ms": 1000 * step16, "raw_tps16": 16 / step16,
    }


def generate(threads: int) -> dict:
    """One generate() per request, on the engine's thread as in a worker, on transformers' own layers."""
    eng = GenerateEngine(loader(threads, fuse=False)).start()
    try:
        return {**lone(eng, prompts(eng.loaded)), "kernels": eng.loaded.kernels}
    finally:
        eng.stop()


def engine(threads: int) -> dict:
    eng = BatchingEngine(loader(threads), max_batch=16,
                         shared_prefix=lambda tok: shared_prefix_ids(tok, SYSTEM)).start()
    try:
        all_ids = prompts(eng.loaded)
        result = {"lone": lone(eng, all_ids), "min_rows": eng.min_rows}
        started = time.perf_counter()
        futures = [eng.submit(all_ids[i % len(all_ids)], GenerationParams(NEW_TOKENS), lambda _: None)
                   for i in range(16)]
        tokens = sum(f.result().completion_tokens for f in futures)
        result["batch16_tps"] = tokens / (time.perf_counter() - started)
        return result
    finally:
        eng.stop()


if __name__ == "__main__":
    what, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    print(json.dumps({"gauge": gauge, "generate": generate, "engine": engine}[what](threads)))
