"""Which kept prompts a new prompt may start from: the index of the prefix cache, pure Python (no torch).

When a request leaves, the keys and values of its prompt are kept (copied out
of its cache row by the runner), so that the next turn of the conversation,
whose prompt starts with this one, computes only what is new. An entry keeps
only the prompt's whole pieces (:data:`~workers.engine.scheduler.PREFILL_CHUNK`
tokens, counted from where the prompt's computation started): a piece computed
again in a later prompt is the same computation on the same inputs, cut at the
same places, so greedy text with reuse is bit for bit the text without it.
A reply's tokens were computed one at a time while decoding, with other
arithmetic than a prompt piece, so they are computed again in the next turn.

Entries are token-exact: a prompt uses the whole pieces of an entry that it
starts with, as far as the two agree token for token (a reply's text, tokenized
again in the next prompt, may split otherwise than it was generated). Memory is bounded by a number of tokens; the least
recently used entries go first, and an entry that a longer one extends goes at
once (the next turn's entry holds all of it).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0  # prompt tokens taken from kept entries
    prompt_tokens: int = 0  # prompt tokens of every request looked up


class PrefixIndex:
    """Kept prompt prefixes by id, least recently used first, within ``capacity_tokens``."""

    def __init__(self, capacity_tokens: int):
        self.capacity_tokens = max(capacity_tokens, 0)
        self._entries: OrderedDict[int, list[int]] = OrderedDict()
        self._ids = itertools.count()
        self.stats = PrefixStats()

    @property
    def enabled(self) -> bool:
        return self.capacity_tokens > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lengths(self) -> dict[int, int]:
        """How many tokens each kept entry holds, by id."""
        return {entry_id: len(tokens) for entry_id, tokens in self._entries.items()}

    def lookup(self, prompt: list[int], origin: int, piece: int) -> tuple[int, int] | None:
        """The kept entry that shares the most tokens with the start of ``prompt``, and how many of them to take:
        whole pieces of ``piece`` tokens counted from ``origin`` (where the prompt's pieces are cut), more than
        ``origin`` and leaving at least one token of the prompt to compute. None where no entry gives any."""
        self.stats.lookups += 1
        self.stats.prompt_tokens += len(prompt)
        best = None
        for entry_id, tokens in self._entries.items():
            shared = _shared(prompt, tokens, len(prompt) - 1)
            n = origin + (shared - origin) // piece * piece
            if n > origin and (best is None or n > best[1]):
                best = (entry_id, n)
        if best is not None:
            self._entries.move_to_end(best[0])
            self.stats.hits += 1
            self.stats.reused_tokens += best[1]
        return best

    def clear(self) -> list[int]:
        """Forget every entry; their ids."""
        ids = list(self._entries)
        self._entries.clear()
        return ids

    def insert(self, tokens: list[int]) -> tuple[int | None, list[int]]:
        """Keep ``tokens``: (its new entry id, or None when already kept or too long; the ids of entries dropped)."""
        if not self.enabled or len(tokens) > self.capacity_tokens:
            return None, []
        dropped = []
        for entry_id, kept in list(self._entries.items()):
            if len(kept) <= len(tokens) and tokens[:len(kept)] == kept:
                if len(kept) == len(tokens):  # the same prompt again
                    self._entries.move_to_end(entry_id)
                    return None, []
                dropped.append(entry_id)  # held whole by the new one
        for entry_id in dropped:
            del self._entries[entry_id]
        held = sum(len(t) for t in self._entries.values())
        while self._entries and held + len(tokens) > self.capacity_tokens:
            entry_id, kept = self._entries.popitem(last=False)
            held -= len(kept)
            dropped.append(entry_id)
        entry_id = next(self._ids)
        self._entries[entry_id] = list(tokens)
        return entry_id, dropped


def _shared(a: list[int], b: list[int], most: int) -> int:
    """How many tokens ``a`` and ``b`` share from the start, at most ``most``."""
    n = min(len(a), len(b), most)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo
