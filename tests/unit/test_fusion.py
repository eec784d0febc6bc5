"""Fused query/key/value and gate/up projections compute what transformers' own layers do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from workers.fusion import FusedGatedMLP, FusedLlamaAttention, LlamaPass, fuse_projections
from workers.kernels import pack_linears


def tiny_llama(bias: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(config).eval()


def decode(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens and each step's logits, with transformers' own cache."""
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.inference_mode():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, token], dim=1)
            out = model(input_ids=token, cache=cache, use_cache=True)
    return ids, logits


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_fused_layers_compute_what_the_separate_ones_do(bias, pack):
    stock = tiny_llama(bias)
    fused = copy.deepcopy(stock)
    said = fuse_projections(fused)
    assert said == "query/key/value and gate/up projections fused in 4 modules"
    assert all(isinstance(layer.self_attn, FusedLlamaAttention) and isinstance(layer.mlp, FusedGatedMLP)
               for layer in fused.model.layers)
    if pack:
        pack_linears(stock, 16)
        pack_linears(fused, 16)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    want_ids, want = decode(stock, ids, 6)
    got_ids, got = decode(fused, ids, 6)
    assert torch.equal(got_ids, want_ids)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # and through generate(), with its own cache and masks
        assert torch.equal(fused.generate(ids, max_new_tokens=6, do_sample=False),
                           stock.generate(ids, max_new_tokens=6, do_sample=False))


def test_fused_layers_hold_no_second_copy_of_the_weights():
    stock = tiny_llama(False)
    fused = copy.deepcopy(stock)
    fuse_projections(fused)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in stock.parameters())


def test_other_architectures_are_left_as_transformers_ships_them():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    classes = [type(m) for m in model.modules()]
    assert fuse_projections(model) == "projections as transformers ships them (no Llama layers to fuse)"
    assert [type(m) for m in model.modules()] == classes


def test_layers_already_prepacked_are_not_stacked():
    model = tiny_llama(False)
    pack_linears(model, 16)
    assert fuse_projections(model) == "projections as transformers ships them (no Llama layers to fuse)"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_the_lean_pass_gives_the_logits_of_the_models_forward(bias, packed):
    model = tiny_llama(bias)
    fuse_projections(model)
    if packed:  # the pass calls prepacked layers on its rows directly
        assert pack_linears(model, 16).endswith("prepacked for oneDNN")
    lean = LlamaPass.of(model, 64)
    assert lean is not None
    ids = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(2))
    stored = {}

    def write(layer, keys, values):  # one sequence: keep the layer's keys and values
        stored[layer] = keys, values

    def attend(layer, module, queries):  # causal attention over that sequence, key heads shared by groups
        keys, values = (t.repeat_interleave(module.num_key_value_groups, dim=1).transpose(0, 1)
                        for t in stored[layer])
        out = torch.nn.functional.scaled_dot_product_attention(queries.transpose(0, 1), keys, values, is_causal=True)
        return out.transpose(0, 1)

    with torch.inference_mode():
        want = model(input_ids=ids[None]).logits[0]
        keep = torch.tensor([0, 5, 10])
        got = lean(ids, torch.arange(11), write, attend, keep)
    assert torch.allclose(got, want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_pass_norms_and_rotates_bit_for_bit_as_transformers_does(dtype):
    model = tiny_llama(False).to(dtype)
    fuse_projections(model)
    lean = LlamaPass.of(model, 128)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 64, generator=generator).to(dtype)
    with torch.inference_mode():
        for norm, taken in ((model.model.layers[1].post_attention_layernorm, lean.layers[1].post_norm),
                            (model.model.norm, lean.final_norm)):
            assert torch.equal(lean._rms(taken, hidden), norm(hidden))
        positions = torch.tensor([0, 1, 7, 64, 100, 127])
        heads, kv_heads, dim = 4, 2, 16
        query = torch.randn(6, heads, dim, generator=generator).to(dtype)
        key = torch.randn(6, kv_heads, dim, generator=generator).to(dtype)
        cos, sin = model.model.rotary_emb(hidden[None], positions[None])
        want_q, want_k = apply_rotary_pos_emb(query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
        turned = lean._rotate(torch.cat((query, key), dim=1), lean.cos[positions][:, None],
                              lean.signed_sin[positions][:, None])
    assert torch.equal(turned[:, :heads], want_q[0].transpose(0, 1))
    assert torch.equal(turned[:, heads:], want_k[0].transpose(0, 1))


def test_the_lean_pass_takes_only_fused_llama_layers_with_fixed_rotary_angles():
    assert LlamaPass.of(tiny_llama(False), 64) is None  # not fused
    dynamic = tiny_llama(False)
    dynamic.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    dynamic.model.rotary_emb.rope_type = "dynamic"
    fuse_projections(dynamic)
    assert LlamaPass.of(dynamic, 64) is None
    assert LlamaPass.of(nn.Linear(2, 2), 64) is None
