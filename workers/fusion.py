"""Fused projections for Llama-family decoder layers, swapped into the transformers model.

transformers computes a layer's query, key and value with three matrix
products and its gated MLP's gate and up with two more, each reading the same
input. Stacking their weights makes one product of each (as vLLM's model
implementations and its transformers backend do): at batch 1 on a 2-core CPU a
decode step took about 0.8x the time. Each output element is still the dot
product of one weight row with the input, so the numbers come out as the
separate products give them.

Only the layer's attention and MLP modules are replaced; the model's own
forward pass, rotary embeddings, attention functions and caches run as
transformers ships them. Architectures other than Llama's (SmolLM2 is one)
are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm,
                                                      apply_rotary_pos_emb, eager_attention_forward)

from workers.kernels import on_rows


def _stack(linears: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the given layers' outputs side by side."""
    first = linears[0]
    biased = [layer.bias is not None for layer in linears]
    if any(biased) and not all(biased):
        raise ValueError("layers to stack must all have a bias or none")
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in linears])
        stacked = nn.Linear(first.in_features, weight.shape[0], bias=all(biased),
                            device=weight.device, dtype=weight.dtype)
        stacked.weight.copy_(weight)
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([layer.bias for layer in linears]))
    stacked.requires_grad_(False)
    return stacked


class FusedLlamaAttention(nn.Module):
    """``LlamaAttention`` with one product for query, key and value; otherwise its forward, step for step."""

    def __init__(self, attn: LlamaAttention):
        super().__init__()
        self.config, self.layer_idx, self.head_dim = attn.config, attn.layer_idx, attn.head_dim
        self.num_key_value_groups, self.scaling = attn.num_key_value_groups, attn.scaling
        self.attention_dropout, self.is_causal = attn.attention_dropout, attn.is_causal
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv_proj = _stack([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        if cache is None:  # the name transformers used before 5.x's rename
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.qkv_proj(hidden_states).split(self.sizes, dim=-1)
        query = query.view(hidden_shape).transpose(1, 2)
        key = key.view(hidden_shape).transpose(1, 2)
        value = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class FusedGatedMLP(nn.Module):
    """``LlamaMLP`` with one product for gate and up."""

    def __init__(self, mlp: LlamaMLP):
        super().__init__()
        self.half = mlp.gate_proj.out_features
        self.gate_up_proj = _stack([mlp.gate_proj, mlp.up_proj])
        self.down_proj, self.act_fn = mlp.down_proj, mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.half, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> str:
    """Swap fused attention and MLP modules into every Llama decoder layer; say what was done.

    Call it before the linear layers are prepacked (:func:`workers.kernels.pack_linears`):
    stacking needs their plain weights. Modules of any other class (a subclass
    may compute differently) are left alone.
    """
    fused = 0
    for layer in model.modules():
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if type(attn) is LlamaAttention and all(
                type(p) is nn.Linear for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
            layer.self_attn = FusedLlamaAttention(attn)
            fused += 1
        if type(mlp) is LlamaMLP and type(mlp.gate_proj) is nn.Linear and type(mlp.up_proj) is nn.Linear:
            layer.mlp = FusedGatedMLP(mlp)
            fused += 1
    if not fused:
        return "projections as transformers ships them (no Llama layers to fuse)"
    return f"query/key/value and gate/up projections fused in {fused} modules"


# Rotary embeddings whose frequencies are fixed at load (the others change with the sequence's length).
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


class LlamaPass:
    """A decoding pass over a fused Llama model's own modules, without transformers' forward around them.

    The batching engine's passes are one sequence of tokens that belong to
    different cache rows, so transformers' masks and cache bookkeeping do
    nothing for them; going through its module calls, hooks and casts took
    about a tenth of a pass at batch 1 here. This runs the same arithmetic on
    the same weights (the logits come out bit for bit as the model's forward
    gives them) with rotary angles read from a table, and with fewer tensor
    operations, each of which costs several microseconds of dispatch on CPU:

    - The norm, rotary and MLP arithmetic is written out here rather than
      called through ``LlamaRMSNorm``, ``apply_rotary_pos_emb`` and
      :class:`FusedGatedMLP`; the casts to float32 and back are skipped where
      the model already is float32 (they would return their input).
    - Queries and keys sit side by side in the fused projection's output and
      are rotated together, and ``rotate_half(x) * sin`` is computed as
      ``x.roll(half) * sin`` with the sign folded into the sine table: the
      same products, exactly (negation is exact).
    - Prepacked linear layers are called on the pass's rows directly.

    On a 2-core CPU this took 0.95x the time of the pass that called those
    modules at 16 decoding rows, 0.90x at one (same thread, alternated step by
    step, the logits equal).
    """

    def __init__(self, model: nn.Module, max_tokens: int):
        inner = model.model
        self.embed = inner.embed_tokens
        self.final_norm = _norm(inner.norm)
        self.lm_head = on_rows(model.lm_head)
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        queries, keys, _ = first.sizes
        self.query_heads = queries // self.head_dim
        self.rotated = queries + keys  # the projection's columns that rotary embedding turns
        self.float32 = self.embed.weight.dtype == torch.float32
        self.layers = [_LlamaLayer(layer) for layer in inner.layers]
        rotary = inner.rotary_emb
        # As transformers computes them per pass (LlamaRotaryEmbedding.forward), for every position at once.
        freqs = torch.arange(max_tokens, device=rotary.inv_freq.device)[:, None].float() * rotary.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        dtype = self.embed.weight.dtype
        self.cos = (angles.cos() * rotary.attention_scaling).to(dtype)
        sin = (angles.sin() * rotary.attention_scaling).to(dtype)
        self.half = half = self.head_dim // 2
        # rotate_half(x) is (-x2, x1): times sin, that is (x2, x1) times (-sin1, sin2).
        self.signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    @classmethod
    def of(cls, model: nn.Module, max_tokens: int) -> LlamaPass | None:
        """The pass for a model whose every layer was fused by :func:`fuse_projections`; None for any other."""
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if not layers or getattr(getattr(inner, "rotary_emb", None), "rope_type", None) not in STATIC_ROPE:
            return None
        norms = [inner.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if not all(type(layer) is LlamaDecoderLayer and type(layer.self_attn) is FusedLlamaAttention
                   and type(layer.mlp) is FusedGatedMLP for layer in layers):
            return None
        if not all(type(n) is LlamaRMSNorm for n in norms) or type(inner.embed_tokens) is not nn.Embedding:
            return None
        return cls(model, max_tokens)

    def _rms(self, norm: tuple[torch.Tensor, float], x: torch.Tensor) -> torch.Tensor:
        """``LlamaRMSNorm.forward``."""
        weight, eps = norm
        h = x if self.float32 else x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * (h if self.float32 else h.to(x.dtype))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``apply_rotary_pos_emb`` on heads (tokens, heads, head dim); ``cos`` and ``sin`` are rows of
        ``self.cos`` and ``self.signed_sin``."""
        return x * cos + x.roll(self.half, -1) * sin

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, write, attend, keep: torch.Tensor) -> torch.Tensor:
        """Logits of the tokens at ``keep``, for ``ids`` at ``positions`` (one token each, any rows).

        ``write(layer, keys, values)`` stores a layer's keys and values, each
        (tokens, kv heads, head dim); ``attend(layer, module, queries)`` gives
        its attention output for queries (tokens, heads, head dim).
        """
        tokens, dim, split, heads = ids.shape[0], self.head_dim, self.rotated, self.query_heads
        hidden = self.embed(ids)
        cos, sin = self.cos[positions][:, None], self.signed_sin[positions][:, None]
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._rms(layer.input_norm, hidden))
            turned = self._rotate(qkv[:, :split].view(tokens, -1, dim), cos, sin)
            write(i, turned[:, heads:], qkv[:, split:].view(tokens, -1, dim))
            hidden = hidden + layer.o(attend(i, layer.attn, turned[:, :heads]).reshape(tokens, -1))
            gate, up = layer.gate_up(self._rms(layer.post_norm, hidden)).split(layer.half, dim=-1)
            hidden = hidden + layer.down(layer.act(gate) * up)
        return self.lm_head(self._rms(self.final_norm, hidden[keep]))


def _norm(norm: LlamaRMSNorm) -> tuple[torch.Tensor, float]:
    return norm.weight, norm.variance_epsilon


class _LlamaLayer:
    """What :class:`LlamaPass` uses of one fused decoder layer, looked up once."""

    def __init__(self, layer: LlamaDecoderLayer):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn = attn
        self.input_norm, self.post_norm = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        self.qkv, self.o = on_rows(attn.qkv_proj), on_rows(attn.o_proj)
        self.gate_up, self.down = on_rows(mlp.gate_up_proj), on_rows(mlp.down_proj)
        self.act, self.half = mlp.act_fn, mlp.half
