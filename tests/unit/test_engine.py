"""The batching engine on the real model (no servers): continuous batching that changes no answer."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

from app.protocol import SamplingParams
from config.settings import DEFAULT_MODEL_DIR, Settings
from workers.engine import PREFILL_CHUNK, SPAN_BUCKET, BatchingEngine, GenerateEngine
from workers.kernels import Float16Linear, PaddedRows, RowRule, float16_linears_available, pad_linears
from workers.model import LoadedModel, load_model, pick_dtype
from workers.prompt import build_prompt_ids, shared_prefix_ids

PROMPTS = ["What is the capital of France?", "Explain how a rainbow forms, step by step.",
           "Describe a busy morning at a city market.", "Give some tips for learning a new language.",
           "How does a bicycle work?", "Write a haiku about autumn.", "What is 2+2?", "Name three primary colours."]


# The dtypes the engine picks on CPU: float32, and bfloat16 (native with avx512_bf16 or amx_bf16, emulated
# elsewhere). The tests of batch invariance run in both, whatever this machine picks.
DTYPES = ["float32", "bfloat16"]
# The rest run in the dtype a worker here picks (CHAT_DTYPE, auto by default).
DTYPE = Settings().dtype
# Float32 engines keep float16 weights where FBGEMM is there, as a worker's do (CHAT_FLOAT16_WEIGHTS, auto).
FLOAT16_WEIGHTS = Settings().float16_weights == "auto"


@pytest.fixture(scope="module")
def engines():
    """One engine per dtype, started when first asked for."""
    started: dict[str, BatchingEngine] = {}

    def get(dtype: str) -> BatchingEngine:
        if dtype not in started:
            # Loaded on the engine's thread, as a worker does, with the system prompt's tokens cached, and run
            # below the other threads.
            started[dtype] = BatchingEngine(lambda: load_model(str(DEFAULT_MODEL_DIR), dtype_setting=dtype,
                                                               float16_weights=FLOAT16_WEIGHTS),
                                            max_batch=8, max_tokens=512, prefix_cache_mb=64, nice=ENGINE_NICE,
                                            shared_prefix=lambda tok: shared_prefix_ids(tok, SYSTEM)).start()
        return started[dtype]

    yield get
    for eng in started.values():
        eng.stop()


@pytest.fixture(scope="module")
def engine(engines):
    """The engine in the dtype a worker here picks: ``CHAT_DTYPE``'s, as in the integration tests' worker."""
    return engines(str(pick_dtype(DTYPE, torch.device("cpu"))[0]).removeprefix("torch."))


@pytest.fixture(scope="module", params=DTYPES)
def each_dtype(request, engines):
    """The engine in each dtype the engine may pick on a CPU, for the tests that must hold in all of them."""
    return engines(request.param)


@pytest.fixture(scope="module")
def loaded(engine):
    return engine.loaded


SYSTEM = "You are a helpful assistant."
ENGINE_NICE = 3


def nice_of(thread_id: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, thread_id)


def ids(loaded, prompt: str, system: str = SYSTEM) -> list[int]:
    return build_prompt_ids(loaded.tokenizer, system, [{"role": "user", "content": prompt}], 400)


def bicycle_conversation(loaded, reply: str) -> list[int]:
    """A three-turn conversation whose length grows with the assistant's ``reply``."""
    history = [{"role": "user", "content": "Tell me about the history of the bicycle in Europe."},
               {"role": "assistant", "content": reply},
               {"role": "user", "content": "And what came next?"}]
    return build_prompt_ids(loaded.tokenizer, SYSTEM, history, 400)


def wait_for_passes(engine, n: int) -> None:
    started = engine.steps
    while engine.steps < started + n:
        threading.Event().wait(0.01)


def run(engine, loaded, prompt, n=24, **kw):
    pieces: list[str] = []
    result = engine.generate(ids(loaded, prompt), SamplingParams(n, **kw), pieces.append)
    assert "".join(pieces) == result.text
    return result


def padded_stock_model(dtype: torch.dtype) -> LoadedModel:
    """transformers' own layers, with the linear layers that round by row count padded (or split) as the engine
    pads them."""
    stock = load_model(str(DEFAULT_MODEL_DIR), dtype_setting=str(dtype).removeprefix("torch."), fuse=False)
    pad_linears(stock.model, 1, 512, head=stock.model.get_output_embeddings())
    return stock


def test_greedy_answer_alone_matches_generate(engine, loaded):
    """The engine (fused projections, ragged cache) answers as generate() on transformers' own layers does.

    generate() decodes one row at a time: its linear layers are padded as
    the engine's are, so that both compute a row as a batch computes it.
    """
    assert "fused in 60 modules" in loaded.kernels
    result = run(engine, loaded, PROMPTS[0])
    assert "Paris" in result.text
    assert result.finish_reason == "stop"
    generate = GenerateEngine(lambda: padded_stock_model(loaded.dtype)).start()
    try:
        baseline = generate.generate(ids(loaded, PROMPTS[0]), SamplingParams(24), lambda s: None)
        longer = generate.generate(ids(loaded, PROMPTS[1]), SamplingParams(48), lambda s: None)
    finally:
        generate.stop()
    assert baseline.text == result.text and baseline.completion_tokens == result.completion_tokens
    # A longer reply may part where two tokens are as likely as rounding allows: the engine's decoding rows attend
    # over their span's bucket with a mask, generate() over the exact length, and SDPA rounds the two otherwise in
    # bfloat16 (logits up to about 0.6 apart). Where the replies part, the model ranks both next tokens alike.
    mine = run(engine, loaded, PROMPTS[1], 48).text
    print(f"engine: {mine!r}\ngenerate(): {longer.text!r}")
    if mine != longer.text:
        assert_a_near_tie_where_they_part(loaded, ids(loaded, PROMPTS[1]), mine, longer.text)


def assert_a_near_tie_where_they_part(loaded: LoadedModel, prompt: list[int], one: str, other: str) -> None:
    tok = loaded.tokenizer
    a, b = tok.encode(one, add_special_tokens=False), tok.encode(other, add_special_tokens=False)
    same = next(i for i, (x, y) in enumerate(zip([*a, None], [*b, None])) if x != y)
    assert same >= 8, (one, other)  # not at the start
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt + a[:same]])).logits[0, -1].float()
    top = logits.max().item()
    ranks = [logits[t].item() for t in {*a[same:same + 1], *b[same:same + 1]}]  # each reply's next token, if any
    print(f"parted after {same} tokens: logits {ranks} against the top {top}")
    assert all(top - r <= 1.0 for r in ranks)  # both within bfloat16's rounding of the most likely


def test_the_engine_and_its_torch_threads_run_below_the_rest_of_the_process(engine):
    base = nice_of(threading.get_native_id())
    assert nice_of(engine._thread.native_id) == min(base + ENGINE_NICE, 19)
    run(engine, engine.loaded, PROMPTS[1])  # its torch threads are at work, started from its thread
    below = [int(t.name) for t in os.scandir("/proc/self/task") if nice_of(int(t.name)) == min(base + ENGINE_NICE, 19)]
    print(f"threads below the process's {base}: {len(below)}, torch threads: {torch.get_num_threads()}")
    assert engine._thread.native_id in below and len(below) >= torch.get_num_threads()
    assert nice_of(threading.get_native_id()) == base  # the rest of the process as it was


def test_greedy_output_does_not_depend_on_the_batch(each_dtype):
    engine, loaded = each_dtype, each_dtype.loaded
    alone = [run(engine, loaded, p).text for p in PROMPTS]
    futures = [engine.submit(ids(loaded, p), SamplingParams(24), lambda s: None) for p in PROMPTS]
    together = [f.result(120).text for f in futures]
    assert together == alone


def test_greedy_output_does_not_depend_on_when_the_others_arrive(each_dtype):
    """Requests that join while others decode, a few passes apart, in one order and in the reverse one."""
    engine, loaded = each_dtype, each_dtype.loaded
    alone = [run(engine, loaded, p, 32).text for p in PROMPTS]
    for order in (PROMPTS, PROMPTS[::-1]):
        futures = {}
        for i, p in enumerate(order):
            if i:  # the next request joins a few passes after the one before it
                steps = engine.steps
                deadline = time.monotonic() + 60
                while engine.steps < steps + 1 + i % 4 and not futures[order[i - 1]].done():
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
            futures[p] = engine.submit(ids(loaded, p), SamplingParams(32), lambda s: None)
        assert [futures[p].result(120).text for p in PROMPTS] == alone


def assert_batch_invariant(load, kernels: str) -> None:
    """An engine on the model ``load`` gives, whose kernels say ``kernels``: greedy text alone is its text in a batch."""
    engine = BatchingEngine(load, max_batch=8, max_tokens=512,
                            shared_prefix=lambda tok: shared_prefix_ids(tok, SYSTEM)).start()
    try:
        loaded = engine.loaded
        assert kernels in loaded.kernels
        alone = [run(engine, loaded, p).text for p in PROMPTS]
        futures = [engine.submit(ids(loaded, p), SamplingParams(24), lambda s: None) for p in PROMPTS]
        assert [f.result(120).text for f in futures] == alone
        assert all(alone)
    finally:
        engine.stop()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_with_quantized_weights_greedy_output_does_not_depend_on_the_batch_either(quantize, dtype):
    assert_batch_invariant(lambda: load_model(str(DEFAULT_MODEL_DIR), dtype_setting=dtype, quantize=quantize),
                           f"{quantize.upper()} weights")


@pytest.mark.skipif(not float16_linears_available(), reason="no FBGEMM in this torch or on this CPU")
def test_a_float32_engine_keeps_float16_weights_as_a_worker_does_and_float32_ones_when_told(engines):
    """The float32 engine of the tests above runs FBGEMM's float16 weights (where a worker's does, by default);
    turned off, the layers are oneDNN's float32 ones and greedy text does not depend on the batch either."""
    half = engines("float32")
    # Every projection of the 30 layers, and the vocabulary's (a kind FBGEMM would need many rows of padding for
    # on some CPU gets its float32 weights back when the engine measures it: printed).
    assert FLOAT16_WEIGHTS == ("121 linear layers with float16 weights computed in float32 (FBGEMM)"
                               in half.loaded.kernels)
    layers = [m for m in half.loaded.model.modules() if isinstance(m, Float16Linear)]
    print(f"{len(layers)} layers with float16 weights, padded here to:",
          {kind: str(rule) for kind, rule in half.padded.items()})
    assert FLOAT16_WEIGHTS or not layers
    assert_batch_invariant(lambda: load_model(str(DEFAULT_MODEL_DIR), dtype_setting="float32", float16_weights=False),
                           "121 linear layers prepacked for oneDNN")


def test_rows_of_different_spans_decode_as_they_would_alone(each_dtype):
    """Long and short rows side by side, the long ones crossing a span bucket and changing places."""
    engine, loaded = each_dtype, each_dtype.loaded
    # A prompt that starts in the second span bucket and leaves it while decoding.
    long_ids = max((bicycle_conversation(loaded, "Bicycles appeared in the nineteenth century " * n)
                    for n in range(1, 40)),
                   key=lambda p: len(p) if len(p) < 2 * SPAN_BUCKET - 8 else 0)
    assert 2 * SPAN_BUCKET - 40 < len(long_ids) < 2 * SPAN_BUCKET - 8
    alone_long = engine.generate(long_ids, SamplingParams(40), lambda s: None).text
    alone_short = [run(engine, loaded, p, n=40).text for p in PROMPTS[:3]]
    futures = [engine.submit(ids(loaded, p), SamplingParams(40), lambda s: None) for p in PROMPTS[:3]]
    futures.insert(1, engine.submit(long_ids, SamplingParams(40), lambda s: None))
    texts = [f.result(120).text for f in futures]
    assert texts == [alone_short[0], alone_long, *alone_short[1:]]


def test_padding_to_the_measured_rows_keeps_plain_layers_batch_invariant():
    """Plain (not prepacked) layers are measured and padded too; a pass with fewer rows than the whole-pass
    minimum is padded with throw-away rows."""
    eng = BatchingEngine(lambda: load_model(str(DEFAULT_MODEL_DIR), dtype_setting=DTYPE, prepack_rows=0),
                         max_batch=8, max_tokens=256).start()
    try:
        assert "prepacking off" in eng.loaded.kernels
        assert 1 <= eng.min_rows <= 8
        alone = [run(eng, eng.loaded, p, n=12).text for p in PROMPTS[:4]]
        futures = [eng.submit(ids(eng.loaded, p), SamplingParams(12), lambda s: None) for p in PROMPTS[:4]]
        assert [f.result(120).text for f in futures] == alone
        # A prompt of fewer tokens than that minimum, computed beside a decoding row: the pass is padded
        # and the prompt's first token still comes from its own logits.
        eng.runner.min_rows = 8  # at least the measured minimum (above), whatever this machine measured
        tiny = ids(eng.loaded, PROMPTS[0])[-3:]
        tiny_alone = eng.generate(tiny, SamplingParams(12), lambda s: None).text
        decoding = eng.submit(ids(eng.loaded, PROMPTS[1]), SamplingParams(30), lambda s: None)
        wait_for_passes(eng, 3)
        assert eng.generate(tiny, SamplingParams(12), lambda s: None).text == tiny_alone
        assert decoding.result(120).text == run(eng, eng.loaded, PROMPTS[1], n=30).text
    finally:
        eng.stop()


class OtherNumbersAlone(nn.Linear):
    """A stand-in, on any CPU, for a kernel that rounds a row differently when it is the only row: computed
    alone, a row whose first input is positive comes out otherwise (as oneDNN's bfloat16 kernel does in a few
    outputs of some rows, never in the first row of a block)."""

    def forward(self, x):
        out = super().forward(x)
        rows = x.reshape(-1, self.in_features)
        return out * 1.5 if rows.shape[0] == 1 and rows[0, 0] > 0 else out


def with_a_layer_that_differs_alone() -> LoadedModel:
    """The model, with layer 2's down projection (the one oneDNN rounds by row count in bfloat16) swapped for
    :class:`OtherNumbersAlone` on the same weights."""
    lm = load_model(str(DEFAULT_MODEL_DIR), dtype_setting=DTYPE, prepack_rows=0)
    mlp = lm.model.model.layers[2].mlp
    down = mlp.down_proj
    mlp.down_proj = OtherNumbersAlone(down.in_features, down.out_features, bias=False,
                                      device=down.weight.device, dtype=down.weight.dtype)
    mlp.down_proj.weight = down.weight
    return lm


def test_a_layer_that_rounds_a_lone_row_otherwise_is_found_at_start_and_padded_around():
    eng = BatchingEngine(with_a_layer_that_differs_alone, max_batch=8, max_tokens=256).start()
    try:
        # At least 2; more where the plain product underneath also rounds a few rows otherwise (float32 under MKL).
        assert eng.padded["OtherNumbersAlone 1536x576"].least >= max(2, eng.padded.get("Linear 1536x576",
                                                                                        RowRule(1)).least)
        padded = eng.loaded.model.model.layers[2].mlp.down_proj
        assert isinstance(padded, PaddedRows) and isinstance(padded.layer, OtherNumbersAlone)
        prompts = PROMPTS[:4]
        futures = [eng.submit(ids(eng.loaded, p), SamplingParams(16), lambda s: None) for p in prompts]
        together = [f.result(120).text for f in futures]
        assert [run(eng, eng.loaded, p, n=16).text for p in prompts] == together
        padded.least = 1  # without the padding, a lone request's text changes: the layer does matter
        assert [run(eng, eng.loaded, p, n=16).text for p in prompts] != together
    finally:
        eng.stop()


class ActivationOtherwiseAlone(nn.SiLU):
    """SiLU that gives other numbers when the pass has one row: no linear layer, so only the check of whole
    passes can find it."""

    def forward(self, x):
        out = super().forward(x)
        return out * 1.5 if x.reshape(-1, x.shape[-1]).shape[0] == 1 else out


def with_an_activation_that_differs_alone() -> LoadedModel:
    lm = load_model(str(DEFAULT_MODEL_DIR), dtype_setting=DTYPE)
    lm.model.model.layers[2].mlp.act_fn = ActivationOtherwiseAlone()
    return lm


def test_any_other_operation_that_differs_alone_is_found_by_checking_whole_passes_and_padded_around():
    eng = BatchingEngine(with_an_activation_that_differs_alone, max_batch=8, max_tokens=256).start()
    try:
        assert eng.min_rows == 2  # a pass of one row is padded with a throw-away row
        prompts = PROMPTS[:4]
        futures = [eng.submit(ids(eng.loaded, p), SamplingParams(16), lambda s: None) for p in prompts]
        together = [f.result(120).text for f in futures]
        assert [run(eng, eng.loaded, p, n=16).text for p in prompts] == together
        eng.runner.min_rows = 1  # without it, a lone request's text changes
        assert [run(eng, eng.loaded, p, n=16).text for p in prompts] != together
    finally:
        eng.stop()


def test_a_model_without_fused_layers_runs_through_its_own_forward_and_answers_alike(engine, loaded):
    """transformers' forward with the ragged attention function: the same text as the lean pass, in any batch."""
    eng = BatchingEngine(lambda: load_model(str(DEFAULT_MODEL_DIR), dtype_setting=DTYPE, fuse=False), max_batch=8,
                         max_tokens=512, shared_prefix=lambda tok: shared_prefix_ids(tok, SYSTEM)).start()
    try:
        assert eng.runner.lean is None and engine.runner.lean is not None
        long_prompt = bicycle_conversation(loaded, "Bicycles spread across Europe in the 1800s. " * 20)
        assert len(long_prompt) - len(eng.prefix) > 2 * PREFILL_CHUNK  # three pieces
        want = [run(engine, loaded, p, n=16).text for p in PROMPTS[:3]]
        want_long = engine.generate(long_prompt, SamplingParams(16), lambda s: None).text
        futures = [eng.submit(ids(loaded, p), SamplingParams(16), lambda s: None) for p in PROMPTS[:3]]
        wait_for_passes(eng, 2)
        got_long = eng.generate(long_prompt, SamplingParams(16), lambda s: None).text
        assert [f.result(120).text for f in futures] == want
        assert got_long == want_long
    finally:
        eng.stop()


def test_requests_join_and_leave_between_steps(engine, loaded):
    """A long request keeps going while short ones join late and finish first.

    The short ones' prompts are computed in the long one's decoding passes:
    it takes no more passes than it has tokens.
    """
    started = engine.steps
    long_first = engine.submit(ids(loaded, PROMPTS[1]), SamplingParams(40), lambda s: None)
    wait_for_passes(engine, 5)
    short = [engine.submit(ids(loaded, p), SamplingParams(3 + i), lambda s: None) for i, p in enumerate(PROMPTS[2:5])]
    short_results = [f.result(120) for f in short]
    assert [r.completion_tokens for r in short_results] == [3, 4, 5]
    assert all(r.finish_reason == "length" for r in short_results)
    assert not long_first.done()  # the short ones left while the long one was still decoding
    assert long_first.result(120).completion_tokens == 40
    assert engine.steps - started == 40
    assert long_first.result().text == run(engine, loaded, PROMPTS[1], n=40).text


def test_cancel_drops_the_request_at_the_next_step(engine, loaded):
    cancel = threading.Event()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    other = engine.submit(ids(loaded, PROMPTS[3]), SamplingParams(30), lambda s: None)
    result = engine.generate(ids(loaded, PROMPTS[1]), SamplingParams(60), on_text, cancel)
    assert result.finish_reason == "cancelled"
    assert 3 <= result.completion_tokens <= 4
    assert result.text == "".join(pieces)
    assert other.result(120).completion_tokens == 30  # the rest of the batch carried on


def test_a_request_cancelled_before_it_starts_makes_nothing(engine, loaded):
    cancel = threading.Event()
    cancel.set()
    result = engine.generate(ids(loaded, PROMPTS[0]), SamplingParams(10), lambda s: None, cancel)
    assert (result.finish_reason, result.completion_tokens, result.text) == ("cancelled", 0, "")


def test_temperature_samples_per_request(each_dtype):
    engine, loaded = each_dtype, each_dtype.loaded
    greedy = run(engine, loaded, PROMPTS[5], n=20).text
    futures = [engine.submit(ids(loaded, PROMPTS[5]), SamplingParams(20, temperature=1.5), lambda s: None)
               for _ in range(4)]
    futures.append(engine.submit(ids(loaded, PROMPTS[5]), SamplingParams(20), lambda s: None))
    texts = [f.result(120).text for f in futures]
    assert texts[-1] == greedy  # a greedy row beside sampled rows stays greedy
    assert any(t != greedy for t in texts[:-1])


def test_a_long_prompt_computed_in_pieces_decodes_as_it_would_alone(each_dtype):
    """A prompt of several pieces, its pieces spread over passes that also decode and start other requests."""
    engine, loaded = each_dtype, each_dtype.loaded
    long_ids = bicycle_conversation(loaded, "Bicycles appeared in the nineteenth century. " * 30)
    assert len(long_ids) - len(engine.prefix) > 2 * PREFILL_CHUNK
    assert len(long_ids) - len(engine.prefix) > engine.prefill_tokens_per_pass  # more than one pass
    alone_long = engine.generate(long_ids, SamplingParams(24), lambda s: None).text
    alone_short = [run(engine, loaded, p).text for p in PROMPTS[:3]]
    futures = [engine.submit(ids(loaded, p), SamplingParams(24), lambda s: None) for p in PROMPTS[:3]]
    futures.append(engine.submit(long_ids, SamplingParams(24), lambda s: None))
    assert [f.result(120).text for f in futures] == [*alone_short, alone_long]


def test_more_requests_than_slots_all_finish(engine, loaded):
    futures = [engine.submit(ids(loaded, PROMPTS[i % 8]), SamplingParams(4), lambda s: None) for i in range(20)]
    assert [f.result(120).completion_tokens for f in futures] == [4] * 20 or all(
        f.result().finish_reason in ("stop", "length") for f in futures)


def test_prompt_too_long_for_the_cache_is_refused(engine):
    with pytest.raises(ValueError):
        engine.submit(list(range(100, 100 + engine.max_tokens)), SamplingParams(4), lambda s: None)


def test_a_stopped_engine_refuses_and_fails_what_waited(loaded):
    eng = BatchingEngine(loaded, max_batch=2, max_tokens=256).start()
    eng.stop()
    with pytest.raises(RuntimeError):
        eng.submit(ids(loaded, PROMPTS[0]), SamplingParams(4), lambda s: None)


def test_token_ids_outside_the_vocabulary_are_refused_before_anything_runs(engine):
    steps = engine.steps
    for bad in ([10**7] * 5, [5, -1]):
        with pytest.raises(ValueError, match="token ids"):
            engine.submit(bad, SamplingParams(4), lambda s: None)
    assert engine.steps == steps


def test_a_failing_pass_fails_its_requests_and_the_engine_serves_on(engine, loaded):
    plan = engine.runner.cache.plan

    def broken(*args):
        engine.runner.cache.plan = plan  # fails once
        raise RuntimeError("pass failed")

    engine.runner.cache.plan = broken
    failed = engine.submit(ids(loaded, PROMPTS[0]), SamplingParams(4), lambda s: None)
    with pytest.raises(RuntimeError, match="pass failed"):  # the pass's own error, not a timeout
        failed.result(60)
    assert "Paris" in run(engine, loaded, PROMPTS[0]).text


def test_prompts_with_and_without_the_cached_prefix_decode_as_they_would_alone(each_dtype):
    engine, loaded = each_dtype, each_dtype.loaded
    assert engine.prefix and ids(loaded, "Hi")[:len(engine.prefix)] == engine.prefix
    other = "You answer in one short sentence."  # another system prompt: the whole prompt is computed
    prompts = [ids(loaded, p) for p in PROMPTS[:3]] + [ids(loaded, p, other) for p in PROMPTS[:3]]
    assert all(p[:len(engine.prefix)] != engine.prefix for p in prompts[3:])
    alone = [engine.generate(p, SamplingParams(24), lambda s: None).text for p in prompts]
    together = [f.result(120).text for f in [engine.submit(p, SamplingParams(24), lambda s: None) for p in prompts]]
    assert together == alone
    assert "Paris" in alone[0]


LONG_QUESTION = ("I am planning a long cycling trip along the rivers of Europe next summer, starting in the "
                 "Netherlands and riding south through Germany, Switzerland and France over about six weeks. "
                 "I have a steel touring bicycle, panniers, a small tent and a stove, but I have never ridden "
                 "more than two days in a row. What should I think about before I go, how should I train in the "
                 "months before, and what should I carry so that I can fix the bicycle by myself on the road? I would "
                 "also like to know how to plan the route: whether to follow the marked long-distance cycle paths "
                 "or make my own way on small roads, how to find places to eat and shop for food, and whether I "
                 "should book anything in advance or just ride each day as far as I feel like going. My budget is about "
                 "forty euros a day, I speak some German but no French, and I would like to visit a few old towns "
                 "and castles on the way without riding on busy main roads.")
FOLLOW_UP = ("Thank you. Now think about the weather: it may rain for days on end, and the mountain passes of "
             "Switzerland can be cold even in July, while the south of France can be very hot. How should I "
             "plan each day's distance, where should I sleep when the campsites are full, and how much water "
             "and food should I carry between towns? Please also say what I should do if I fall ill.")


def test_later_turns_that_start_from_the_kept_prompt_answer_as_they_would_computed_whole(each_dtype):
    """Each turn's prompt starts with the turn before; the engine keeps that prompt's whole pieces, computes the
    reply's again as a prompt's once the turn is over, and the next turn computes only the rest. Its greedy text
    is the text of the same prompt computed whole (kept prompts dropped first), in each dtype, alone and beside
    other requests; the template renders earlier turns alike."""
    engine, loaded = each_dtype, each_dtype.loaded
    engine.forget_kept()
    prefix = len(engine.prefix)
    history = [{"role": "user", "content": LONG_QUESTION}]
    prompts, replies_kept = [], 0
    for turn, follow_up in enumerate([FOLLOW_UP, "Which of those matters most?", None]):
        prompt = build_prompt_ids(loaded.tokenizer, SYSTEM, history, 512 - 40)
        if prompts:
            assert prompt[:len(prompts[-1])] == prompts[-1]  # the earlier turns are rendered alike
        prompts.append(prompt)
        beside = [engine.submit(ids(loaded, p), SamplingParams(30), lambda s: None) for p in PROMPTS[:3]] \
            if turn == 2 else []
        wait_until_kept(engine)
        reused = engine.generate(prompt, SamplingParams(40), lambda s: None)
        if turn:
            assert reused.cached_tokens >= prefix + PREFILL_CHUNK  # started from the turn before
            replies_kept += reused.cached_tokens > len(prompts[-2])  # and from its reply
        engine.forget_kept()
        whole = engine.generate(prompt, SamplingParams(40), lambda s: None)
        assert whole.cached_tokens == prefix  # only the system prompt's tokens
        assert reused.text == whole.text and reused.finish_reason == whole.finish_reason
        assert all(f.result(120).completion_tokens for f in beside)
        if follow_up:
            history += [{"role": "assistant", "content": reused.text}, {"role": "user", "content": follow_up}]
    assert engine.kept_stats.hits >= 2 and replies_kept >= 1


def test_an_idle_engine_copies_out_a_finished_turn_before_the_next_request_comes(engine):
    """The keys and values of a finished turn's prompt, and of its reply computed again, are copied out of their
    rows while the engine has nothing else to do, not in the next request's first pass."""
    engine.forget_kept()
    prompt = build_prompt_ids(engine.loaded.tokenizer, SYSTEM, [{"role": "user", "content": LONG_QUESTION}], 472)
    reply = engine.generate(prompt, SamplingParams(120), lambda s: None)
    wait_until_kept(engine)

    def in_cache() -> dict[int, int]:
        return {entry: keys[0].shape[1] for entry, (keys, _) in dict(engine.runner.cache.kept).items()}

    deadline = time.monotonic() + 30
    while in_cache() != engine.scheduler.kept.lengths():  # copied by the engine's thread, with no request to come
        assert time.monotonic() < deadline, "the kept prompt waits for the next request to be copied out"
        time.sleep(0.01)
    prefix, tokens = len(engine.prefix), len(prompt) + reply.completion_tokens
    assert max(in_cache().values()) == prefix + (tokens - prefix) // PREFILL_CHUNK * PREFILL_CHUNK  # reply too


def wait_until_kept(engine, timeout: float = 60) -> None:
    """Until no finished turn's reply is being computed again to be kept."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.keepers:
        assert time.monotonic() < deadline
        time.sleep(0.01)
