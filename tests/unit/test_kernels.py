"""Prepacked linear layers, and the padding of layers that round a row differently by row count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from workers.engine.runner import AttentionPlan, attend
from workers.kernels import (Float16Linear, alike_at_multiples, Int4Linear, Int8Linear, PackedLinear, PaddedRows, PassRows,
                             RowRule,
                             float16_linears_available, least_rows, mkl_mode, pack_linears, pad_linears, padded_count,
                             quantize_linears, row_counts, row_rule)

FIXTURES = Path(__file__).parent / "fixtures"


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.SiLU(), nn.Sequential(nn.Linear(96, 32, bias=False)))


def test_packed_layers_compute_what_plain_ones_do():
    plain = small_model()
    packed = small_model()
    said = pack_linears(packed, 16)
    assert said == "2 linear layers prepacked for oneDNN"
    assert isinstance(packed[0], PackedLinear) and isinstance(packed[2][0], PackedLinear)
    x = torch.randn(5, 7, 64)  # any leading shape
    with torch.inference_mode():
        assert torch.allclose(packed(x), plain(x), rtol=1e-4, atol=1e-5)


needs_fbgemm = pytest.mark.skipif(not float16_linears_available(), reason="FBGEMM computes float16 weights on x86 "
                                  "CPUs with AVX2; this torch or CPU has none")


@needs_fbgemm
def test_float16_weights_keep_a_bfloat16_checkpoints_values_and_compute_in_float32():
    plain = small_model()
    for layer in (plain[0], plain[2][0]):  # weights as a bfloat16 checkpoint holds them, loaded in float32
        layer.weight.data = layer.weight.data.bfloat16().float()
    half = small_model()
    half.load_state_dict(plain.state_dict())
    said = pack_linears(half, 16, float16=True)
    assert said == "2 linear layers with float16 weights computed in float32 (FBGEMM)"
    assert isinstance(half[0], Float16Linear) and isinstance(half[2][0], Float16Linear)
    kept, bias = torch.ops.quantized.linear_unpack_fp16(half[0].packed)
    assert torch.equal(kept, plain[0].weight) and torch.equal(bias, plain[0].bias)  # every value as it was
    x = torch.randn(5, 7, 64)
    with torch.inference_mode():
        got, want = half(x), plain(x)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # Only the order of the sums differs: float32's rounding, not float16's (2 ** -11 of the largest output).
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@needs_fbgemm
def test_weights_that_float16_would_round_or_a_model_in_another_dtype_keep_their_own():
    trained = small_model()  # float32 weights with every bit in use: float16 would round them
    assert pack_linears(trained, 16, float16=True) == "2 linear layers prepacked for oneDNN"
    mixed = small_model()
    mixed[0].weight.data = mixed[0].weight.data.bfloat16().float()
    assert pack_linears(mixed, 16, float16=True) == ("1 linear layers with float16 weights computed in float32 "
                                                      "(FBGEMM), 1 prepacked for oneDNN")
    assert isinstance(mixed[0], Float16Linear) and isinstance(mixed[2][0], PackedLinear)
    in_bfloat16 = small_model().bfloat16()
    pack_linears(in_bfloat16, 16, float16=True)
    assert not any(isinstance(m, Float16Linear) for m in in_bfloat16.modules())
    big = small_model()
    big[0].weight.data[0, 0] = 1e5  # beyond float16's range
    big[0].weight.data = big[0].weight.data.bfloat16().float()
    pack_linears(big, 16, float16=True)
    assert isinstance(big[0], PackedLinear)


@needs_fbgemm
def test_float16_weights_are_padded_to_their_measured_rows_and_then_compute_alike():
    """On this machine's FBGEMM: whatever rule the probe finds, a padded row comes out alike at every count."""
    model = small_model()
    for layer in (model[0], model[2][0]):
        layer.weight.data = layer.weight.data.bfloat16().float()
    pack_linears(model, 16, float16=True)
    found = pad_linears(model, 16, 64)
    print("rows FBGEMM's float16 product is padded to here:", {kind: str(rule) for kind, rule in found.items()})
    x = torch.randn(64, 64)
    with torch.inference_mode():
        together = model(x)
        for n in (*range(1, 17), 31, 32, 37, 63):
            assert torch.equal(model(x[:n]), together[:n])


class Float16RoundsOffBelow48Rows(Float16Linear):
    """FBGEMM's float16 product as it might be on another CPU: alike only from more rows than are worth padding,
    and below them not at every count alike either (so not to be called on few rows instead)."""

    def rows(self, x):
        out = super().rows(x)
        return out + 1e-3 * (1 + x.shape[0] % 2) if x.shape[0] < 48 else out


@needs_fbgemm
def test_float16_layers_that_would_need_many_rows_of_padding_get_float32_weights_instead():
    model = small_model()
    for layer in (model[0], model[2][0]):
        layer.weight.data = layer.weight.data.bfloat16().float()
    want = small_model()
    want.load_state_dict(model.state_dict())
    model[0] = Float16RoundsOffBelow48Rows(model[0])
    pack_linears(model, 16, float16=True)
    found = pad_linears(model, 16, 64)
    assert "PackedLinear 64x96" in found and "Float16RoundsOffBelow48Rows 64x96" not in found
    layer = model[0].layer if isinstance(model[0], PaddedRows) else model[0]
    assert isinstance(layer, PackedLinear) and padded_count_of(model[0]) <= 2
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert (model(x) - want(x)).abs().max() <= 1e-5 * want(x).abs().max()  # the same weights' values


def padded_count_of(layer) -> int:
    """How many rows ``layer`` computes a lone row in."""
    return padded_count(1, layer.least, layer.step) if isinstance(layer, PaddedRows) else 1


# mode: what quantize_linears says, the layer class, its weights' bytes per weight, the products' relative error
# allowed (each weight within half a step: 255 steps an output for INT8, 16 a group of 32 for INT4).
QUANTIZED_WAYS = {
    "int8": ("2 linear layers with INT8 weights (one scale per output)", Int8Linear, 1, 0.05),
    "int4": ("2 linear layers with INT4 weights (a scale and an offset per 32 weights)", Int4Linear, 0.5, 0.1),
}


@pytest.mark.parametrize("mode", QUANTIZED_WAYS)
def test_quantized_weights_compute_close_to_the_plain_layers_in_each_dtype_in_fewer_bytes(mode):
    said, kind, bytes_per_weight, tolerance = QUANTIZED_WAYS[mode]
    for dtype in (torch.float32, torch.bfloat16):
        plain = small_model().to(dtype)
        quantized = small_model().to(dtype)
        # A float32 model's quantized layers compute in bfloat16: the kernels' float32 paths are far slower.
        assert quantize_linears(quantized, mode) == said + (" computed in bfloat16" if dtype == torch.float32 else "")
        layer = quantized[0]
        assert isinstance(layer, kind) and isinstance(quantized[2][0], kind)
        weights = layer.qweight if kind is Int8Linear else layer.packed
        scales = layer.scales if kind is Int8Linear else layer.scales_and_offsets
        assert scales.dtype == torch.bfloat16
        assert weights.nbytes == plain[0].weight.numel() * bytes_per_weight
        x = torch.randn(5, 7, 64).to(dtype)
        with torch.inference_mode():
            out = quantized(x)
            want, got = plain(x).float(), out.float()
        assert out.dtype == dtype
        assert (got - want).norm() / want.norm() < tolerance, dtype


def test_int8_weights_are_each_within_half_a_step_and_the_largest_may_be_clipped_only_to_lower_the_error():
    torch.manual_seed(1)
    linear = nn.Linear(256, 8)
    with torch.no_grad():
        linear.weight[0, 0] = 4.0  # one outlier: a scale from it would leave the rest few steps
    layer = Int8Linear(linear)
    dequantized = layer.qweight.float() * layer.scales[:, None].float()
    error = ((dequantized - linear.weight) ** 2).sum(dim=1)
    # The scale from the largest weight, rounded as the kernel holds its scales.
    absmax_scale = (linear.weight.abs().amax(dim=1, keepdim=True) / 127).to(layer.scales.dtype).float()
    absmax_steps = torch.round(linear.weight / absmax_scale).clamp(-127, 127)
    absmax_error = ((absmax_steps * absmax_scale - linear.weight) ** 2).sum(dim=1)
    assert torch.all(error <= absmax_error + 1e-12)
    assert layer.qweight.abs().max() <= 127


def test_int4_groups_give_back_weights_that_lie_on_16_steps_as_a_q4_1_file_holds_them():
    torch.manual_seed(2)
    outputs, inputs = 16, 96
    scale = torch.rand(outputs, inputs // 32, 1) * 0.01 + 0.001
    least = torch.randn(outputs, inputs // 32, 1) * 0.02
    steps = torch.randint(0, 16, (outputs, inputs // 32, 32))
    steps[..., 0], steps[..., 1] = 0, 15  # each group spans its whole range, as Q4_1's do in practice
    weight = (steps * scale + least).view(outputs, inputs)
    linear = nn.Linear(inputs, outputs, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    layer = Int4Linear(linear)
    with torch.inference_mode():
        got = layer.dequantized()
    # Only bfloat16's rounding of the scale, the offset and the product: each weight lies nearer its own step than
    # any other, by far.
    step = scale.expand(-1, -1, 32).reshape(outputs, inputs)
    assert torch.all((got - weight).abs() < step / 4), ((got - weight).abs() / step).max()


def test_int4_needs_whole_groups_of_inputs_and_outputs_in_sixteens():
    said = "weights as loaded (INT4 takes inputs in whole groups of 32 and outputs in 16s, not every layer's)"
    for model in (nn.Sequential(nn.Linear(48, 16)), nn.Sequential(nn.Linear(64, 8))):
        assert quantize_linears(model, "int4") == said
        assert type(model[0]) is nn.Linear


def test_after_padding_a_row_computes_alike_in_any_batch_on_this_machine():
    for way in ("plain", "packed", "int8", "int4"):
        model = small_model()
        if way == "packed":
            pack_linears(model, 16)
        elif way in ("int8", "int4"):
            quantize_linears(model, way)
        pad_linears(model, 16, 64)
        x = torch.randn(64, 64)
        with torch.inference_mode():
            want = model(x)
            for m in range(1, 17):
                assert torch.equal(torch.cat([model(x[i:i + m]) for i in range(0, 64 // m * m, m)]),
                                   want[:64 // m * m]), m


class RowByRow(nn.Linear):
    """Each output a sum over one row's products, whatever the other rows: alike in any batch."""

    def forward(self, x):
        return (x.unsqueeze(-2) * self.weight).sum(-1) + self.bias


class RoundsOffAloneInSomeRows(RowByRow):
    """Computed alone, a row rounds differently, but only a row whose first input is large: about one in a
    hundred, and not the first row of the probe's block (as oneDNN's bfloat16 kernel over one row)."""

    def forward(self, x):
        out = super().forward(x)
        if x.shape[0] == 1 and x[0, 0] > 2.3:
            return out + 1e-3
        return out


class RoundsOffBelowThreeRows(RowByRow):
    def forward(self, x):
        out = super().forward(x)
        return out + 1e-3 if x.shape[0] < 3 else out


class RoundsAlikeInThrees(RowByRow):
    """A kernel that works in blocks of three rows and rounds the one or two rows left over otherwise (as FBGEMM's
    float16 product does): alike at every multiple of three rows, and at no few rows from which on."""

    def forward(self, x):
        out = super().forward(x)
        left = x.shape[0] % 3
        return torch.cat((out[:x.shape[0] - left], out[x.shape[0] - left:] + 1e-3)) if left else out


class RoundsAlikeInThreesSaveAt45(RoundsAlikeInThrees):
    """As :class:`RoundsAlikeInThrees`, and otherwise again at 45 rows: a count the probe's doublings pass by."""

    def forward(self, x):
        out = super().forward(x)
        return out + 1e-3 if x.shape[0] == 45 else out


class RoundsOffFrom48Rows(RowByRow):
    """Another kernel for long passes (pieces of prompts beside the decoding rows)."""

    def forward(self, x):
        out = super().forward(x)
        return out + 1e-3 if x.shape[0] >= 48 else out


def test_row_counts_cover_every_decoding_count_then_doublings_up_to_the_longest_pass():
    assert row_counts(4, 4) == [1, 2, 3, 4]
    assert row_counts(4, 20) == [1, 2, 3, 4, 8, 16, 20]
    assert row_counts(16, 272) == [*range(1, 17), 32, 64, 128, 256, 272]


def probe(layer, rows=16, most=64) -> int:
    return least_rows(layer, row_counts(rows, most))


def test_the_probe_finds_where_rounding_stops_changing():
    assert probe(RowByRow(8, 8)) == 1
    assert probe(RoundsOffBelowThreeRows(8, 4)) == 3
    assert probe(RoundsOffFrom48Rows(8, 4)) == 64  # counts below 48 differ from a full pass


def test_a_kernel_that_rounds_alike_only_in_whole_blocks_is_padded_to_a_multiple_of_its_block():
    layer = RoundsAlikeInThrees(8, 4)
    counts = row_counts(16, 64)
    assert least_rows(layer, counts) == 64  # no few rows from which on: every count that leaves one or two over
    assert least_rows(layer, counts, step=2) > 2 and least_rows(layer, counts, step=3) == 1
    assert row_rule(layer, counts) == RowRule(1, 3) and str(RowRule(1, 3)) == "multiples of 3"
    assert row_rule(RoundsOffBelowThreeRows(8, 4), counts) == RowRule(3)  # a few rows from which on: no step
    model = nn.Sequential(layer)
    assert pad_linears(model, 16, 64) == {"RoundsAlikeInThrees 8x4": RowRule(1, 3)}
    x = torch.randn(40, 8)
    with torch.inference_mode():
        together = model(x[:39])
        for n in range(1, 40):
            assert torch.equal(model(x[:n]), together[:n])


def test_a_multiple_is_taken_only_where_every_multiple_up_to_the_longest_pass_rounds_alike():
    layer, counts = RoundsAlikeInThreesSaveAt45(8, 4), row_counts(16, 64)
    assert least_rows(layer, counts, step=3) == 1  # the probe's counts, padded to threes, do not meet 45
    assert not alike_at_multiples(layer, 3, 64) and alike_at_multiples(layer, 6, 64)
    assert row_rule(layer, counts) == RowRule(1, 6)


def test_the_probe_compares_every_row_not_only_the_first():
    layer = RoundsOffAloneInSomeRows(8, 4)
    block = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))  # the probe's block
    assert block[0, 0] <= 2.3 and (block[:, 0] > 2.3).any()  # rows other than the first trigger it
    assert probe(layer) == 2


def test_layers_that_round_by_row_count_are_padded_and_then_compute_alike():
    model = nn.Sequential(RowByRow(8, 8), nn.Sequential(RoundsOffAloneInSomeRows(8, 8)), RoundsOffBelowThreeRows(8, 4))
    found = pad_linears(model, 8, 16)
    assert found == {"RowByRow 8x8": RowRule(1), "RoundsOffAloneInSomeRows 8x8": RowRule(2),
                     "RoundsOffBelowThreeRows 8x4": RowRule(3)}
    assert type(model[0]) is RowByRow  # a layer that needs no padding is left as it was
    assert isinstance(model[1][0], PaddedRows) and model[1][0].least == 2
    assert isinstance(model[2], PaddedRows) and model[2].least == 3
    x = torch.randn(256, 8) * 3
    with torch.inference_mode():
        together = model(x)
        alone = torch.cat([model(row[None]) for row in x])
        assert torch.equal(alone, together)
        assert torch.equal(model(x[None, :5])[0], together[:5])  # any leading shape
        assert not torch.equal(model[1][0].layer(x[:1] * 0 + 3), model[1][0].layer(x[:2] * 0 + 3)[:1])
    # Measuring again measures the layers themselves and pads anew, never a padded layer.
    assert pad_linears(model, 8, 16) == found
    assert isinstance(model[2].layer, RoundsOffBelowThreeRows)


class RoundsAlikeToThirtyTwoAndFrom64(RowByRow):
    """One kernel up to 32 rows and another from 64 on, each alike at its own counts, and rounding otherwise
    between them (as oneDNN's bfloat16 product where the CPU has AMX)."""

    def forward(self, x):
        out = super().forward(x)
        n = x.shape[0]
        return out if n <= 32 else out + 1e-3 if n >= 64 else out + 2e-3 * n


def test_a_kernel_alike_at_few_rows_and_again_at_many_is_called_on_few_rows_rather_than_padded_to_many():
    layer, counts = RoundsAlikeToThirtyTwoAndFrom64(8, 4), row_counts(16, 128)
    assert row_rule(layer, counts) == RowRule(64)  # without decoding rows to spare: every call padded to 64
    assert row_rule(layer, counts, decoding=16) == RowRule(1, 1, 32)
    assert str(RowRule(1, 1, 32)) == "at most 32" and RowRule(1, 1, 32).pads
    assert row_rule(layer, counts, decoding=40) == RowRule(64)  # 40 decoding rows in one call would round otherwise
    assert row_rule(RoundsOffBelowThreeRows(8, 4), counts, decoding=16) == RowRule(3)  # one and two differ
    assert row_rule(RowByRow(8, 4), counts, decoding=16) == RowRule(1)  # nothing padded: nothing split
    model = nn.Sequential(layer)
    assert pad_linears(model, 16, 128) == {"RoundsAlikeToThirtyTwoAndFrom64 8x4": RowRule(1, 1, 32)}
    assert isinstance(model[0], PaddedRows) and model[0].most == 32
    x = torch.randn(200, 8)
    with torch.inference_mode():
        together = model(x)  # in calls of 32 rows, and one of 8
        assert torch.equal(together, torch.cat([layer(x[i:i + 1]) for i in range(200)]))  # each as alone
        for n in (1, 5, 16, 33, 64, 100):
            assert torch.equal(model(x[:n]), together[:n])
        assert not torch.equal(layer(x[:64]), together[:64])  # called whole, 64 rows would round otherwise


def test_given_the_pass_rows_a_kernel_for_few_rows_and_one_for_many_keep_a_pass_first_rows_apart():
    layer, counts = RoundsAlikeToThirtyTwoAndFrom64(8, 4), row_counts(16, 128)
    rule = row_rule(layer, counts, decoding=16, prompts=112)
    assert rule == RowRule(64, 1, 0, 32) and rule.pads
    assert str(rule) == "decoding rows in calls of at most 32, prompts' later rows in calls of at least 64"
    assert row_rule(layer, counts, decoding=16) == RowRule(1, 1, 32)  # without the pass's rows to go by
    model, pass_rows = nn.Sequential(layer), PassRows()
    assert pad_linears(model, 16, 128, pass_rows=pass_rows) == {"RoundsAlikeToThirtyTwoAndFrom64 8x4": rule}
    x = torch.randn(120, 8)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(120)])  # the kernel for few rows
        many = layer(x)  # the one for many
        for few, n in ((0, 5), (0, 100), (1, 1), (16, 16), (16, 40), (40, 41), (40, 120), (70, 100)):
            pass_rows.few = few
            got = model(x[:n])
            assert torch.equal(got[:few], alone[:min(few, n)]), (few, n)  # unpadded, in calls of at most 32
            assert torch.equal(got[few:], many[few:n]), (few, n)  # padded up to 64 rows where fewer
        pass_rows.few = 0
    assert not torch.equal(alone[:40], many[:40])  # the two kernels round otherwise


def test_the_vocabulary_projection_is_measured_only_at_decoding_row_counts():
    head = RoundsOffFrom48Rows(8, 4)
    model = nn.Sequential(RowByRow(8, 8), head)
    assert pad_linears(model, 16, 64, head=head) == {"RowByRow 8x8": RowRule(1),
                                                     "RoundsOffFrom48Rows 8x4 (head)": RowRule(1)}
    assert model[1] is head


def test_a_model_without_linear_layers_is_left_alone():
    model = nn.Sequential(nn.ReLU(), nn.Embedding(10, 4))
    assert pack_linears(model, 16) == "0 linear layers prepacked for oneDNN"


def test_mkl_rounds_alike_wherever_its_operands_lie_unless_the_operator_chose_otherwise():
    """Checked in fresh interpreters, MKL's setting read back from MKL after a product."""
    code = ("import workers, torch; torch.randn(64, 64) @ torch.randn(64, 64); "
            "from workers.kernels import mkl_mode; print(mkl_mode())")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}

    def mode(**more: str) -> str:
        return subprocess.run([sys.executable, "-c", code], env={**env, **more}, capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parents[2]).stdout.strip()

    assert mode() == "(True, 'AUTO,STRICT')"
    assert mode(MKL_CBWR="COMPATIBLE") == "(False, 'COMPATIBLE')"  # the operator's own setting is kept
    assert mkl_mode() == (True, "AUTO,STRICT")  # and this process's, through tests/conftest.py


def test_a_decoding_rows_attention_comes_out_alike_alone_and_beside_another_row():
    """Real queries, keys and values (the model's layer 9 in bfloat16, one row of 34 tokens in a span of 64) whose
    attention came out differently alone than beside any other row, on a 2-core AVX-512 machine with MKL rounding
    by where its operands lie: PyTorch's SDPA multiplies in each thread's scratch buffer, and which thread takes a
    head depends on the rows of the call. The greedy text of that request then depended on its batch."""
    case = torch.load(FIXTURES / "decode_attention.pt", weights_only=True)
    key, value, bias = case["key"], case["value"], case["bias"]
    rows, span = case["query"].shape[0], key.shape[2]
    queries = case["query"].reshape(rows, -1, key.shape[-1])  # (rows, heads, head dim), a key head's queries together
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            alone = attend(None, queries[:1], key, value, AttentionPlan([(0, 1, span, bias[:1])], []), case["scale"])
            beside = attend(None, queries, key, value, AttentionPlan([(0, rows, span, bias)], []), case["scale"])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], beside[0])
