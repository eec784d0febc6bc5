"""Building a prompt from a conversation with the model's chat template."""

from __future__ import annotations


def build_prompt_ids(tokenizer, system_prompt: str, history: list[dict], max_prompt_tokens: int) -> list[int]:
    """Token ids of the chat-templated conversation, cut to ``max_prompt_tokens``.

    Whole turns are dropped oldest first; the system prompt always stays. Should
    the newest message alone be too long, its oldest tokens go. A conversation
    that starts with a system message of its own (the OpenAI API's) has it in
    place of ``system_prompt``.
    """
    turns = list(history)
    if turns and turns[0]["role"] == "system":
        system = [turns.pop(0)]
    else:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    while True:
        ids = _template(tokenizer, system + turns)
        if len(ids) <= max_prompt_tokens:
            return ids
        if len(turns) > 1:
            # Drop the oldest turn; never start the kept history with an assistant turn.
            turns.pop(0)
            while len(turns) > 1 and turns[0]["role"] != "user":
                turns.pop(0)
            continue
        return ids[-max_prompt_tokens:]


def _template(tokenizer, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding; older releases a plain list.
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def shared_prefix_ids(tokenizer, system_prompt: str) -> list[int]:
    """The tokens that every prompt with this system prompt starts with (the system turn, templated).

    Found as the common start of a few one-message conversations; the engine
    still checks each prompt against it before using it.
    """
    probes = [_template(tokenizer, ([{"role": "system", "content": system_prompt}] if system_prompt else [])
                        + [{"role": "user", "content": text}]) for text in ("a", "Hello there", "1. ?")]
    n = 0
    while all(n < len(p) for p in probes) and len({p[n] for p in probes}) == 1:
        n += 1
    return probes[0][:n]
