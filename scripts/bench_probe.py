"""In-process measurements for the benchmark, each run in a fresh process and printed as JSON:

    python -m scripts.bench_probe gauge     # raw forward pass at batch 1 and 16
    python -m scripts.bench_probe generate  # one generate() per request, alone
    python -m scripts.bench_probe engine    # the batching engine alone, no stack
    python -m scripts.bench_probe invariance 0 bfloat16  # what batch invariance costs the engine in a dtype
    python -m scripts.bench_probe reuse     # prompts kept across turns, on and off
    python -m scripts.bench_probe quantized # INT8 and INT4 weights against the model's dtype: answers, speed
    python -m scripts.bench_probe compiled  # a lone decoding pass compiled whole against the engine's eager one
    python -m scripts.bench_probe float16   # a float32 engine's linear layers with float16 weights against float32

Each runs in a process of its own so that no other torch thread team shares the cores; a probe that sets
engines against each other gives each engine a process of its own (:class:`EngineProcess`).
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import threading
import time
import traceback

import torch
from transformers import DynamicCache

from app.protocol import SamplingParams
from config.settings import DEFAULT_MODEL_DIR, QUANTIZE_MODES, ROOT, Settings
from scripts.loadgen import PROMPTS
from workers.engine import BatchingEngine, GenerateEngine
from workers.kernels import PaddedRows
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
    result = engine.generate(ids, SamplingParams(NEW_TOKENS), lambda _: stamps.append(time.perf_counter()))
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


def loader(threads: int, fuse: bool = True, dtype: str = "auto", quantize: str = "none",
           float16_weights: bool = Settings().float16_weights == "auto"):
    return lambda: load_model(str(DEFAULT_MODEL_DIR), torch_threads=threads, fuse=fuse, dtype_setting=dtype,
                              quantize=quantize, float16_weights=float16_weights)


def start_engine(threads: int, prefix_cache_mb: float = 0.0, **load) -> BatchingEngine:
    """A started 16-slot engine as a worker builds it (the system prompt's tokens cached), loading with ``load``."""
    return BatchingEngine(loader(threads, **load), max_batch=16, prefix_cache_mb=prefix_cache_mb,
                          shared_prefix=lambda tok: shared_prefix_ids(tok, SYSTEM)).start()


class EngineProcess:
    """A started engine (:func:`start_engine`'s arguments) in a process of its own, as a worker runs one, driven
    through a pipe: ``engine(fn, *args)`` runs ``fn(the engine, *args)`` there (``fn`` a function of this module,
    found there by name) and returns what it returns.

    Two engines in one process slow each other down, even while one of them is idle. Each engine thread leads a
    team of torch (OpenMP) threads of its own; once they outnumber the cores, libgomp stops spinning between
    parallel regions, and each of a pass's hundreds of regions waits for threads to wake. With two engines in one
    process, a lone short prompt's first token took 48 and 56 ms (the engine started first was the slower), against
    30-31 ms with one engine (temporary script, 6 rounds of 8 prompts, bfloat16, this machine). So a probe that
    sets engines against each other keeps each in its own process, and takes them in turn.
    """

    def __init__(self, threads: int, prefix_cache_mb: float = 0.0, **load):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread team inherited
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(target=_serve, args=(theirs, threads, prefix_cache_mb, load), daemon=True)
        self._process.start()
        theirs.close()
        self._answer()  # started

    def __call__(self, fn, *args):
        self._pipe.send((fn.__name__, args))
        return self._answer()

    def _answer(self):
        ok, value = self._pipe.recv()
        if not ok:
            raise RuntimeError(f"in the engine's process: {value}")
        return value

    def stop(self) -> None:
        if self._process.is_alive():
            self._pipe.send(None)
            self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


def _serve(pipe, threads: int, prefix_cache_mb: float, load: dict) -> None:
    """An :class:`EngineProcess`'s own side: start the engine, then run each function named through ``pipe``."""
    try:
        eng = start_engine(threads, prefix_cache_mb, **load)
    except Exception:
        pipe.send((False, traceback.format_exc()))
        return
    pipe.send((True, None))
    try:
        while (call := pipe.recv()) is not None:
            name, args = call
            try:
                pipe.send((True, globals()[name](eng, *args)))
            except Exception:
                pipe.send((False, traceback.format_exc()))
    finally:
        eng.stop()


def engine_prompts(eng) -> list[list[int]]:
    return prompts(eng.loaded)


def described(eng) -> dict:
    """What an engine runs: its dtype, its linear layers' kernels and how they are padded."""
    return {"dtype": str(eng.loaded.dtype).removeprefix("torch."), "kernels": eng.loaded.kernels,
            "padded": {kind: str(rule) for kind, rule in eng.padded.items() if rule.pads}}


def first_token_s(eng, ids: list[int]) -> float:
    """Seconds to the first token of a request alone (4 tokens asked)."""
    return eng.generate(ids, SamplingParams(4), lambda _: None).first_token_s


def turned(questions: list[dict], right: list[bool], wrong: list[bool], also: list[bool] | None = None) -> list[str]:
    """The questions answered right in ``right`` (and in ``also``, where given) but not in ``wrong``."""
    also = also or right
    return [q["q"] for q, a, b, c in zip(questions, right, wrong, also) if a and c and not b]


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


def batch16_tps(engine, all_ids: list[list[int]]) -> float:
    """Output tokens/s of 16 requests submitted at once."""
    started = time.perf_counter()
    futures = [engine.submit(all_ids[i % len(all_ids)], SamplingParams(NEW_TOKENS), lambda _: None)
               for i in range(16)]
    tokens = sum(f.result().completion_tokens for f in futures)
    return tokens / (time.perf_counter() - started)


def engine(threads: int) -> dict:
    eng = start_engine(threads)
    try:
        all_ids = prompts(eng.loaded)
        return {"lone": lone(eng, all_ids), "min_rows": eng.min_rows, "batch16_tps": batch16_tps(eng, all_ids)}
    finally:
        eng.stop()


# Short factual questions, fixed before any quantized run: a reply is right when it holds an accepted answer.
FACTUAL = ROOT / "scripts" / "factual_questions.json"
FACTUAL_TOKENS = 48


def factual_replies(engine, questions: list[dict]) -> list[str]:
    """The engine's greedy reply to each factual question (submitted together: a row's text does not depend on its
    batch)."""
    tok = engine.loaded.tokenizer
    futures = [engine.submit(build_prompt_ids(tok, SYSTEM, [{"role": "user", "content": q["q"]}], 1000),
                             SamplingParams(FACTUAL_TOKENS), lambda _: None) for q in questions]
    return [f.result().text for f in futures]


def factual(engine, questions: list[dict], replies: list[str] | None = None) -> list[bool]:
    """Whether each reply (the engine's, where not given) to the factual questions is right."""
    replies = factual_replies(engine, questions) if replies is None else replies
    return [any(a.lower() in text.lower() for a in q["a"]) for q, text in zip(questions, replies)]


def quantized(threads: int, rounds: str = "3") -> dict:
    """Quantized weights (CHAT_QUANTIZE=int8 and int4) against the model's dtype: the factual questions, then in
    each round a lone request's ITL and 16 requests' tok/s on every engine in turn (the order turned each round);
    medians, and the median of the rounds' own ratios to the model's dtype."""
    engines = {}
    try:
        for mode in ("none", *QUANTIZE_MODES):  # one process each (EngineProcess)
            engines[mode] = EngineProcess(threads, quantize=mode)
        questions = json.loads(FACTUAL.read_text())["questions"]
        right = {mode: eng(factual, questions) for mode, eng in engines.items()}
        # The control: the same weights, unquantized, computed in the other dtype the engine picks on a CPU. A
        # question whose answer turns with that rounding alone is no test of a quantization.
        dtype = engines["none"](described)["dtype"]
        other = "float32" if dtype != "float32" else "bfloat16"
        control = EngineProcess(threads, dtype=other)
        try:
            right_other = control(factual, questions)
        finally:
            control.stop()
        all_ids = engines["none"](engine_prompts)
        itl, tps = {m: [] for m in engines}, {m: [] for m in engines}
        for r in range(int(rounds)):
            for mode in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                itl[mode].append(engines[mode](lone, all_ids)["itl_ms"])
                tps[mode].append(engines[mode](batch16_tps, all_ids))
        return {
            "dtype": dtype, "rounds": int(rounds), "control_dtype": other, "right_control": sum(right_other),
            "control_lost": turned(questions, right["none"], right_other),
            # Right unquantized in both dtypes, wrong quantized.
            "lost_in_both": {m: turned(questions, right["none"], right[m], right_other) for m in QUANTIZE_MODES},
            "kernels": {m: e(described)["kernels"] for m, e in engines.items()},
            "questions": len(questions), "right": {m: sum(r) for m, r in right.items()},
            "lost": {m: turned(questions, right["none"], right[m]) for m in QUANTIZE_MODES},
            "gained": {m: turned(questions, right[m], right["none"]) for m in QUANTIZE_MODES},
            "itl_ms": {m: statistics.median(v) for m, v in itl.items()},
            "batch16_tps": {m: statistics.median(v) for m, v in tps.items()},
            "itl_over_none": {m: statistics.median(a / b for a, b in zip(itl[m], itl["none"]))
                              for m in QUANTIZE_MODES},
            "tps_over_none": {m: statistics.median(a / b for a, b in zip(tps[m], tps["none"]))
                              for m in QUANTIZE_MODES},
        }
    finally:
        for eng in engines.values():
            eng.stop()


def float16(threads: int, rounds: str = "3") -> dict:
    """A float32 engine whose linear layers keep float16 weights (CHAT_FLOAT16_WEIGHTS=auto, where the engine picks
    float32) against one with float32 weights: the factual questions and how many greedy replies came out the same,
    then in each round a lone request (TTFT and ITL) and 16 requests at once on each in turn (the order turned each
    round); medians, and the median of the rounds' own ratios."""
    engines = {}
    try:
        for name in ("float16", "float32"):  # one process each (EngineProcess)
            engines[name] = EngineProcess(threads, dtype="float32", float16_weights=name == "float16")
        questions = json.loads(FACTUAL.read_text())["questions"]
        replies = {name: eng(factual_replies, questions) for name, eng in engines.items()}
        right = {name: eng(factual, questions, replies[name]) for name, eng in engines.items()}
        all_ids = engines["float32"](engine_prompts)
        runs = {name: [] for name in engines}
        for r in range(int(rounds)):
            for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
                runs[name].append({**engines[name](lone, all_ids),
                                   "batch16_tps": engines[name](batch16_tps, all_ids)})

        def median(name: str, key: str) -> float:
            return statistics.median(run[key] for run in runs[name])

        def ratio(key: str) -> float:
            return statistics.median(a[key] / b[key] for a, b in zip(runs["float16"], runs["float32"]))

        about = {name: eng(described) for name, eng in engines.items()}
        return {
            "rounds": int(rounds), "kernels": {name: a["kernels"] for name, a in about.items()},
            "padded": {name: a["padded"] for name, a in about.items()},
            "questions": len(questions), "right": {name: sum(r) for name, r in right.items()},
            "lost": turned(questions, right["float32"], right["float16"]),
            "gained": turned(questions, right["float16"], right["float32"]),
            "same_replies": sum(a == b for a, b in zip(replies["float16"], replies["float32"])),
            **{key: {name: median(name, key) for name in engines} for key in ("ttft_ms", "itl_ms", "batch16_tps")},
            **{f"{key}_ratio": ratio(key) for key in ("ttft_ms", "itl_ms", "batch16_tps")},
        }
    finally:
        for eng in engines.values():
            eng.stop()


def invariance(threads: int, dtype: str = "auto", rounds: int = 5) -> dict:
    """What batch invariance costs: the engine as it runs (the layers that round by row count padded), against
    no padding at all (not invariant where a layer rounds by row count) and against every pass of fewer than
    two rows padded whole, at batch 1 (ITL) and 16 (tok/s). Each round takes the three in turn, each first in
    its turn; a ratio is the median of the rounds' own ratios, each taken at one speed of the machine."""
    eng = start_engine(threads, dtype=dtype)
    padded = [m for m in eng.loaded.model.modules() if isinstance(m, PaddedRows)]
    rules, min_rows = {m: (m.least, m.step, m.most, m.few) for m in padded}, eng.min_rows

    def use(way: str) -> None:
        eng.runner.min_rows = 2 if way == "whole_pass" else min_rows
        for m in padded:
            m.least, m.step, m.most, m.few = rules[m] if way == "as_run" else (1, 1, 0, 0)

    try:
        all_ids = prompts(eng.loaded)
        ways = ["as_run", "unpadded", "whole_pass"]
        itl: dict[str, list[float]] = {w: [] for w in ways}
        tps: dict[str, list[float]] = {w: [] for w in ways}
        timed(eng, all_ids[0])  # warm-up
        for r in range(rounds):
            for way in ways[r % 3:] + ways[:r % 3]:
                use(way)
                itl[way].append(1000 * statistics.median(timed(eng, all_ids[r % len(all_ids)])[1]))
                started = time.perf_counter()
                futures = [eng.submit(all_ids[i % len(all_ids)], SamplingParams(NEW_TOKENS // 2), lambda _: None)
                           for i in range(16)]
                tps[way].append(sum(f.result().completion_tokens for f in futures) / (time.perf_counter() - started))
        use("as_run")

        def ratio(of: dict, way: str, to: str) -> float:
            return statistics.median(a / b for a, b in zip(of[way], of[to]))

        return {"dtype": str(eng.loaded.dtype).removeprefix("torch."), "dtype_reason": eng.loaded.dtype_reason,
                "kernels": eng.loaded.kernels, "min_rows": min_rows,
                "padded": {kind: str(rule) for kind, rule in eng.padded.items() if rule.pads},
                "measured_at_start_s": round(eng.runner.invariance_s, 2), "rounds": rounds,
                "itl_ms": {w: statistics.median(x) for w, x in itl.items()},
                "batch16_tps": {w: statistics.median(x) for w, x in tps.items()},
                "itl_as_run_over_unpadded": ratio(itl, "as_run", "unpadded"),
                "itl_whole_pass_over_unpadded": ratio(itl, "whole_pass", "unpadded"),
                "batch16_as_run_over_unpadded": ratio(tps, "as_run", "unpadded")}
    finally:
        eng.stop()


# The user's side of a six-turn conversation: between them, the model's own greedy replies.
TURNS = [
    "I am planning a long cycling trip along the rivers of Europe next summer, starting in the Netherlands and "
    "riding south through Germany, Switzerland and France over about six weeks. I have a steel touring bicycle, "
    "panniers, a small tent and a stove, but I have never ridden more than two days in a row. What should I think "
    "about before I go?",
    "How should I train in the months before the trip, with a full-time job and only the weekends free for long "
    "rides? Please give me a plan week by week.",
    "What tools and spare parts should I carry so that I can fix the bicycle by myself on the road, and which "
    "repairs should I learn before I leave?",
    "The weather worries me: it may rain for days on end, the mountain passes can be cold even in July, and the "
    "south of France can be very hot. How should I plan each day's distance?",
    "Where should I sleep when the campsites are full, and how much water and food should I carry between towns?",
    "Thank you. Now put all of this together into a short checklist for the week before I leave.",
]
REPLY_TOKENS = 200  # each earlier reply: the six turns' history comes to about 1500 tokens


def _conversation(eng) -> list[list[int]]:
    """The prompts of the six turns, each reply the engine's own greedy answer to the turn before."""
    tok, history, out = eng.loaded.tokenizer, [], []
    for turn in TURNS:
        history.append({"role": "user", "content": turn})
        out.append(build_prompt_ids(tok, SYSTEM, history, eng.context_limit - NEW_TOKENS))
        if len(out) < len(TURNS):
            reply = eng.generate(out[-1], SamplingParams(REPLY_TOKENS), lambda _: None).text
            history.append({"role": "assistant", "content": reply})
    return out


def _serve_turn_five(eng, prompt: list[int]) -> None:
    """Turn 5 served by this engine, as affinity sends a conversation's turns: kept prompts of earlier rounds
    dropped, its reply generated (greedy: the reply turn 6 holds), and the user reading it for a moment."""
    eng.forget_kept()
    eng.generate(prompt, SamplingParams(REPLY_TOKENS), lambda _: None)
    time.sleep(1)
    _until_kept(eng)


def _until_kept(eng) -> None:
    while eng.scheduler.keepers:
        time.sleep(0.01)


def _ttft_beside(eng, prompt: list[int], others: list[list[int]]) -> float:
    """Seconds to the first token of ``prompt`` submitted while ``others`` decode (cancelled after)."""
    stop = threading.Event()
    running = [eng.submit(ids, SamplingParams(1000), lambda _: None, stop) for ids in others]
    while len(eng.scheduler.running) < len(others):  # every other one decoding
        time.sleep(0.01)
    first = eng.generate(prompt, SamplingParams(4), lambda _: None).first_token_s
    stop.set()
    for f in running:
        f.result()
    return first


def _multi_turn_load(eng, chats: int = 16, turns: int = 4) -> dict:
    """``chats`` conversations at once, each taking its turns in a row: time to first token of the later turns,
    and how much of their prompts came from kept ones."""
    kept = eng.kept_stats
    before = (kept.lookups, kept.hits, kept.reused_tokens, kept.prompt_tokens)
    later: list[float] = []

    def chat(i: int) -> None:
        history = []
        for t in range(turns):
            history.append({"role": "user", "content": f"{PROMPTS[(i + t) % len(PROMPTS)]} (visitor {i}, turn {t})"})
            ids = build_prompt_ids(eng.loaded.tokenizer, SYSTEM, history, eng.context_limit - NEW_TOKENS)
            result = eng.generate(ids, SamplingParams(NEW_TOKENS), lambda _: None)
            if t:
                later.append(result.first_token_s)
            history.append({"role": "assistant", "content": result.text})

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(chats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lookups, hits, reused, prompt = (a - b for a, b in zip(
        (kept.lookups, kept.hits, kept.reused_tokens, kept.prompt_tokens), before))
    return {"chats": chats, "turns": turns, "later_ttft_p50_ms": 1000 * statistics.median(later),
            "hit_rate": hits / lookups if lookups else 0.0, "reused_share": reused / prompt if prompt else 0.0}


def reuse(threads: int, rounds: str = "3") -> dict:
    """Time to first token of turn 6 of a conversation of about 1500 tokens, with the worker keeping prompts
    (CHAT_PREFIX_CACHE_MB as set, 512 by default) and without (0); alone and beside 15 chats decoding; first
    turns; a multi-turn load's hit rate. Each round takes both engines in turn."""
    mb = Settings().prefix_cache_mb or 512
    engines = {}
    try:
        for way, size in (("on", mb), ("off", 0)):  # one process each (EngineProcess)
            engines[way] = EngineProcess(threads, prefix_cache_mb=size)
        convo = engines["on"](_conversation)
        firsts = engines["on"](engine_prompts)
        others = firsts * 2
        ttft = {f"{way}_{kind}": [] for way in engines for kind in ("alone", "beside15", "first_turn")}
        for r in range(int(rounds)):
            order = list(engines) if r % 2 == 0 else list(engines)[::-1]  # each engine first in turn
            for way in order:
                eng = engines[way]
                eng(_serve_turn_five, convo[-2])
                ttft[f"{way}_alone"].append(eng(first_token_s, convo[-1]))
                eng(_serve_turn_five, convo[-2])
                ttft[f"{way}_beside15"].append(eng(_ttft_beside, convo[-1], others[:15]))
            for eng in engines.values():
                eng(_until_kept)  # the cancelled chats' replies computed again: idle work, not a first turn's
            for i, ids in enumerate(firsts):  # each prompt on both engines back to back, each first in turn
                for way in order if i % 2 == 0 else order[::-1]:
                    time.sleep(0.05)  # the other process's torch threads stop spinning
                    ttft[f"{way}_first_turn"].append(engines[way](first_token_s, ids))
        out = {"prefix_cache_mb": mb, "history_tokens": len(convo[-1]), "rounds": int(rounds),
               "dtype": engines["on"](described)["dtype"],
               **{f"ttft_{k}_ms": 1000 * statistics.median(v) for k, v in ttft.items()}}
        for kind in ("alone", "beside15", "first_turn"):
            out[f"{kind}_off_over_on"] = out[f"ttft_off_{kind}_ms"] / out[f"ttft_on_{kind}_ms"]
        out["load_on"] = engines["on"](_multi_turn_load)
        out["load_off"] = engines["off"](_multi_turn_load)
        return out
    finally:
        for eng in engines.values():
            eng.stop()


def _lone_pass(lean, kv_heads: int, head_dim: int, layers: int, dtype: torch.dtype, span: int = 128):
    """A function of (ids, positions, mask) that runs ``lean`` (a LlamaPass) for one decoding row over a cache of
    its own: keys and values written in place, SDPA over ``span`` positions, as the engine's bfloat16 pass does."""
    keys = torch.zeros(layers, kv_heads, span, head_dim, dtype=dtype)
    values = torch.zeros_like(keys)
    keep = torch.zeros(1, dtype=torch.long)

    def step(ids, positions, mask):
        def write(i, k, v):
            keys[i].index_copy_(1, positions, k.transpose(0, 1))
            values[i].index_copy_(1, positions, v.transpose(0, 1))

        def attend(i, module, queries):
            out = torch.nn.functional.scaled_dot_product_attention(
                queries.view(1, kv_heads, -1, head_dim), keys[i][None], values[i][None], attn_mask=mask,
                scale=module.scaling)
            return out.view(1, -1, head_dim)

        return lean(ids, positions, write, attend, keep)

    return step


def compiled(threads: int, rounds: str = "10") -> dict:
    """The lean pass of one decoding row compiled whole (torch.compile, inductor with freezing, which prepacks the
    weights itself) against the engine's eager pass on its prepacked layers; alternated, each timed over 20 passes
    a round; compile time, the memory it took, and whether its logits are the eager pass's bit for bit."""
    import psutil
    import torch._dynamo
    import torch._inductor.config
    from workers.fusion import LlamaPass
    torch._inductor.config.freezing = True
    torch._dynamo.config.cache_size_limit = 256  # one graph: every layer's weights are constants of it
    plain = load_model(str(DEFAULT_MODEL_DIR), torch_threads=threads, prepack_rows=0)
    packed = load_model(str(DEFAULT_MODEL_DIR), torch_threads=threads)
    cfg = plain.model.config
    dims = (cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers, plain.dtype)
    ids, positions = torch.tensor([100]), torch.tensor([60])
    mask = torch.zeros(1, 1, 1, 128, dtype=plain.dtype)
    mask[..., 61:] = float("-inf")
    process = psutil.Process()
    with torch.inference_mode():
        eager_plain = _lone_pass(LlamaPass.of(plain.model, 2048), *dims)
        want = eager_plain(ids, positions, mask)
        rss = process.memory_info().rss
        started = time.perf_counter()
        fast = torch.compile(_lone_pass(LlamaPass.of(plain.model, 2048), *dims), dynamic=False)
        got = fast(ids, positions, mask)
        compile_s = time.perf_counter() - started
        grown_mb = (process.memory_info().rss - rss) / 2**20
        eager = _lone_pass(LlamaPass.of(packed.model, 2048), *dims)
        times = {"compiled": [], "eager": []}
        for r in range(int(rounds)):
            for way, fn in (("compiled", fast), ("eager", eager)) if r % 2 == 0 else (("eager", eager),
                                                                                    ("compiled", fast)):
                fn(ids, positions, mask)
                started = time.perf_counter()
                for _ in range(20):
                    fn(ids, positions, mask)
                times[way].append((time.perf_counter() - started) / 20)
    return {"dtype": str(plain.dtype).removeprefix("torch."), "compile_s": compile_s, "memory_mb": grown_mb,
            "compiled_ms": 1000 * statistics.median(times["compiled"]),
            "eager_ms": 1000 * statistics.median(times["eager"]),
            "compiled_over_eager": statistics.median(a / b for a, b in zip(times["compiled"], times["eager"])),
            "bit_for_bit": torch.equal(got, want), "max_logit_difference": (got.float() - want.float()).abs().max().item(),
            "same_greedy_token": got.argmax().item() == want.argmax().item()}


if __name__ == "__main__":
    what, threads = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
    probes = {"gauge": gauge, "generate": generate, "engine": engine, "invariance": invariance, "reuse": reuse,
              "quantized": quantized, "compiled": compiled, "float16": float16}
    print(json.dumps(probes[what](threads, *sys.argv[3:])))
