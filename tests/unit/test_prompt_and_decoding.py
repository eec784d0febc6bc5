"""Prompt building and incremental decoding with the model's real tokenizer (no model run)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from config.settings import DEFAULT_MODEL_DIR
from workers.engine import IncrementalDecoder
from workers.prompt import build_prompt_ids


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def turns(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 20}]
    return out + [{"role": "user", "content": "the newest question"}]


def test_prompt_uses_the_chat_template_and_system_prompt(tokenizer):
    ids = build_prompt_ids(tokenizer, "Be brief.", [{"role": "user", "content": "Hi"}], 1000)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_a_conversations_own_system_message_takes_the_system_prompts_place(tokenizer):
    history = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.decode(build_prompt_ids(tokenizer, "Be brief.", history, 1000))
    assert text.startswith("<|im_start|>system\nAnswer in French.<|im_end|>") and "Be brief." not in text
    # Kept while the oldest turns are cut.
    cut = tokenizer.decode(build_prompt_ids(tokenizer, "Be brief.", history[:1] + turns(10), 200))
    assert cut.startswith("<|im_start|>system\nAnswer in French.<|im_end|>") and "the newest question" in cut


def test_long_history_loses_oldest_turns_first(tokenizer):
    history = turns(10)
    full = build_prompt_ids(tokenizer, "Be brief.", history, 100_000)
    cut = build_prompt_ids(tokenizer, "Be brief.", history, len(full) // 2)
    assert len(cut) <= len(full) // 2
    text = tokenizer.decode(cut)
    assert "Be brief." in text and "the newest question" in text
    assert "question 0 " not in text and "question 9 " in text
    # the kept history starts with a user turn, right after the system prompt
    assert text.split("<|im_end|>\n", 1)[1].startswith("<|im_start|>user")


def test_a_single_message_too_long_keeps_its_end(tokenizer):
    ids = build_prompt_ids(tokenizer, "S", [{"role": "user", "content": "word " * 500}], 50)
    assert len(ids) == 50
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "Ünïcödé ✓ — 東京 🚀🎉 ok", "a\n\nb  c"])
def test_incremental_pieces_join_to_the_decoded_text(tokenizer, text):
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in tokenizer.encode(text, add_special_tokens=False)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
