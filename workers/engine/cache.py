"""KV memory: preallocated keys and values, one row per batch slot, each row with its own length."""

from __future__ import annotations

import torch

from workers.engine.scheduler import CacheOp, Drop, Load, Move, Save, Swap


class RaggedKVCache:
    """Preallocated keys and values, one row per batch slot, each row with its own length.

    The model calls :meth:`update` once per layer per forward pass; before each
    pass the runner says, per token, which row and position its key goes to.
    """

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (slots, kv_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._head_offsets = torch.arange(kv_heads, device=device)[None, :] * max_tokens
        self._flat = torch.zeros(0, dtype=torch.long, device=device)
        # Kept prompts (workers.engine.prefix): per entry, each layer's keys and values of its positions.
        self.kept: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @staticmethod
    def bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def plan(self, rows: torch.Tensor, positions: torch.Tensor) -> None:
        """Token i of the next pass goes to row ``rows[i]`` at position ``positions[i]``."""
        # Where each token's and head's key goes in a layer's cache seen as (slots * heads * tokens, dim):
        # one index_copy_ per layer writes the whole pass.
        _, heads, tokens, _ = self.keys[0].shape
        self._flat = ((rows * heads * tokens + positions)[:, None] + self._head_offsets).reshape(-1)

    def write(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store a layer's keys and values of the pass, each (tokens, heads, dim), where :meth:`plan` said."""
        k, v = self.keys[layer_idx], self.values[layer_idx]
        dim = k.shape[-1]
        k.view(-1, dim).index_copy_(0, self._flat, key.reshape(-1, dim))
        v.view(-1, dim).index_copy_(0, self._flat, value.reshape(-1, dim))

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """The transformers cache interface: key and value (1, heads, tokens, dim); returns the whole cache."""
        self.write(layer_idx, key[0].transpose(0, 1), value[0].transpose(0, 1))
        # The whole cache: ragged_attention slices each row's positions itself.
        return self.keys[layer_idx], self.values[layer_idx]

    def apply(self, op: CacheOp) -> None:
        if isinstance(op, Move):
            self.move(*op)
        elif isinstance(op, Swap):
            self.swap(*op)
        elif isinstance(op, Save):
            self.kept[op.entry] = ([k[op.row, :, :op.length].clone() for k in self.keys],
                                   [v[op.row, :, :op.length].clone() for v in self.values])
        elif isinstance(op, Load):
            keys, values = self.kept[op.entry]
            for k, v, kept_k, kept_v in zip(self.keys, self.values, keys, values):
                k[op.row, :, :op.length] = kept_k[:, :op.length]
                v[op.row, :, :op.length] = kept_v[:, :op.length]
        elif isinstance(op, Drop):
            self.kept.pop(op.entry, None)  # gone already where a failed pass voided its saving

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first ``length`` positions of rows ``a`` and ``b``."""
        for k, v in zip(self.keys, self.values):
            for t in (k, v):
                held = t[a, :, :length].clone()
                t[a, :, :length] = t[b, :, :length]
                t[b, :, :length] = held

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions into row ``dst``."""
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
