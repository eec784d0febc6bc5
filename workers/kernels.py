"""Faster CPU linear layers, and linear layers that compute a row alike whatever its neighbours.

On CPU a plain ``nn.Linear`` calls the BLAS gemm every step, which repacks the
weights each call and switches kernels by the number of rows: on a 2-core
AVX2 machine a step of two rows took 1.6x one of one row, and one row
rounded differently from four. oneDNN can reorder a weight once into its
blocked layout, as ``torch.compile``'s CPU freezing does, through the same
``torch.ops.mkldnn`` operators used here. There a step is mostly the cost of
reading the weights once, whatever the rows. Where the engine computes in
float32 (a CPU without native bfloat16), :class:`Float16Linear` keeps the
weights in float16 instead, half the bytes to read, and FBGEMM computes with
them in float32: a bfloat16 checkpoint loses no value by it.

Greedy text must not depend on what else shares a batch, yet a matrix
product may take another kernel for a few rows and round differently (oneDNN's
bfloat16 kernel over one row, in a few outputs of some rows only; MKL over a
few float32 rows). :func:`pad_linears` measures, layer shape by layer shape,
the fewest rows from which every row of a large random block comes out bit
for bit alike at every row count a pass may have, and wraps the layers that
need more than one row in :class:`PaddedRows`: a call over fewer rows is
padded up to that many, or, for a kernel that rounds alike only at multiples
of a few rows (FBGEMM's float16 product, which works in blocks of rows), up to
the next multiple. Only those layers pay for the padding, not the whole
pass. The engine then checks whole passes of the model (see
``BatchingEngine``), which also covers everything that is not a linear layer.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

logger = logging.getLogger(__name__)

# MKL's reproducibility setting (MKL_CBWR): its strict bit, and the names of its code branches.
_CBWR_STRICT = 0x10000
_CBWR_BRANCHES = {0: "off", 1: "off", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                  9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


def mkl_mode() -> tuple[bool, str] | None:
    """Whether MKL rounds a product alike wherever its operands lie (its strict reproducible mode), and its setting
    as ``MKL_CBWR`` names it; None where torch's library does not expose MKL's setting (another BLAS, another build).

    Read from MKL itself (its getter, which torch's library exports as
    ``mkl_serv_cbwr_get``), since the environment variable only counts when
    set before MKL's first call (see :mod:`workers`).
    """
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    value = get(-1)  # every field of the setting
    branch = _CBWR_BRANCHES.get(value & 0xFFFF, hex(value & 0xFFFF))
    strict = bool(value & _CBWR_STRICT)
    return strict, f"{branch},STRICT" if strict else branch


class PackedLinear(nn.Module):
    """``nn.Linear`` whose weight oneDNN has reordered once (``_reorder_linear_weight``)."""

    def __init__(self, linear: nn.Linear, batch_hint: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for input that already is (rows, in_features)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Float16Linear(nn.Module):
    """A float32 linear layer whose weights are kept in float16: FBGEMM's packed float16 product
    (``quantized::linear_prepack_fp16`` / ``quantized::linear_dynamic_fp16``) widens them to float32 as it reads
    them, and takes and gives float32 rows.

    On a CPU without native bfloat16 the engine computes in float32, and a pass
    over few rows is mostly one read of the weights: float16 ones are half the
    bytes. A model whose checkpoint holds bfloat16 or float16 weights loses
    nothing by it (:func:`float16_holds`). The kernel rounds a row alike only
    at some row counts (every multiple of three on the AVX2 CPU measured, from its
    blocks of rows), which :func:`pad_linears` measures and pads to.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)
        self.probe = torch.empty(0)  # the device and dtype it computes in, for least_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for input that already is (rows, in_features)."""
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def widened(self, batch_hint: int) -> PackedLinear:
        """The same layer with float32 weights (the same values), prepacked for oneDNN."""
        weight, bias = torch.ops.quantized.linear_unpack_fp16(self.packed)
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None)
        linear.weight.data, linear.bias = weight, None if bias is None else nn.Parameter(bias)
        return PackedLinear(linear, batch_hint)


# Float16 keeps every bfloat16 weight above its smallest normal number (6.1e-5) exactly; below, it rounds to steps
# of 6e-8: a weight may move by half such a step, no more.
_FLOAT16_SLACK = 2.0 ** -25


def float16_holds(weight: torch.Tensor) -> bool:
    """Whether ``weight`` keeps its values in float16 (within :data:`_FLOAT16_SLACK`, and none too large)."""
    w = weight.detach().float()
    return bool((w.half().float() - w).abs().max() <= _FLOAT16_SLACK)


def float16_linears_available() -> bool:
    """Whether this torch has FBGEMM, which computes :class:`Float16Linear` (x86 CPUs with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and torch.backends.cpu.get_cpu_capability() in (
        "AVX2", "AVX512")


class PassRows:
    """How many of a pass's first rows a layer that keeps them apart (:class:`PaddedRows` with ``few``) computes in
    calls of few rows: its decoding rows, and the rows of prompts' first positions. Set by the runner for each
    pass; 0 between passes (any other caller's rows are all prompts' rows)."""

    def __init__(self):
        self.few = 0


class PaddedRows(nn.Module):
    """A linear layer that is never called on fewer than ``least`` rows.

    Fewer rows are padded with copies of the first and the copies' results
    dropped: the layer's kernel for few rows rounds differently from the one
    for more, so a row computed alone would differ from the same row in a batch.
    With ``step`` > 1, every call is padded to a multiple of ``step`` rows too,
    for a kernel that rounds a row alike only at such counts. With ``most``, it
    is never called on more than ``most`` rows either: more rows are computed
    in calls of ``most`` rows and one of the rest.

    That is for kernels that switch by row count (oneDNN's bfloat16 product on
    a CPU with AMX: here a row alike from 1 to 32 rows, then in another way,
    and for some shapes in a third from 256 rows on). With ``least`` 1 and
    ``most`` 32 every row is computed by the kernel for few rows, unpadded.
    With ``few``, the pass's first rows that ``apart`` (the runner's
    :class:`PassRows`) names, its decoding rows and its prompts' rows at their
    first positions, are computed apart in calls of at most ``few`` rows,
    unpadded, and only the rest padded and split: a decoding row is then
    always computed by the kernel for few rows, and a long prompt's later rows
    by the one for many, whatever shares the pass.
    """

    def __init__(self, layer: nn.Module, least: int, step: int = 1, most: int = 0, few: int = 0,
                 apart: PassRows | None = None):
        super().__init__()
        self.layer, self.least, self.step, self.most = layer, least, step, most
        self.few, self.apart = few, apart if few else None
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._rows = on_rows(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for input that already is (rows, in_features)."""
        first = min(self.apart.few, x.shape[0]) if self.few and self.apart is not None else 0
        if not first:
            return self._calls(x)
        few = self.few
        parts = [self._rows(x[i:min(i + few, first)]) for i in range(0, first, few)]
        parts += [self._calls(x[first:])] if first < x.shape[0] else []
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _calls(self, x: torch.Tensor) -> torch.Tensor:
        n, most = x.shape[0], self.most
        if most and n > most:
            return torch.cat([self._padded(x[i:i + most]) for i in range(0, n, most)])
        return self._padded(x)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        want = padded_count(n, self.least, self.step)
        if n == want:
            return self._rows(x)
        return self._rows(torch.cat((x, x[:1].expand(want - n, -1))))[:n]


def padded_count(rows: int, least: int, step: int = 1) -> int:
    """How many rows a call over ``rows`` is padded to: at least ``least``, and a multiple of ``step``."""
    return max(least, -(-rows // step) * step)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantized kernels compute a model of ``dtype`` in: bfloat16 for a float32 model, whose
    input and output are rounded to it on the way, since their float32 paths are 4 to 60 times slower than
    their bfloat16 ones even without native bfloat16 (per call of 1 to 64 rows, on AVX-512 and held to AVX2)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


class Int8Linear(nn.Module):
    """Weight-only INT8: each output's weights as int8 with one scale (symmetric, rounded to nearest), through
    ``torch.ops.aten._weight_int8pack_mm``; the input and output keep the model's dtype, computed in
    :func:`kernel_dtype`'s.

    A pass that reads the weights once reads half the bytes of bfloat16 ones. The
    kernel computes each row on its own, so a row comes out alike at every row
    count (:func:`pad_linears` checks it as any other layer).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = kernel_dtype(weight.dtype)
        w = weight.float()
        most = w.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        # Each output's scale: its largest weight, or a little less where clipping that one loses less than the
        # finer steps win for all the others (the least squared error of the few tried).
        best_scale, best_error = torch.zeros_like(most), torch.full_like(most, float("inf"))
        for clip in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75):
            scale = (most * clip / 127).to(self.dtype).float()  # as the kernel will have it
            error = ((torch.round(w / scale).clamp(-127, 127) * scale - w) ** 2).sum(dim=1, keepdim=True)
            best_scale = torch.where(error < best_error, scale, best_scale)
            best_error = torch.minimum(error, best_error)
        self.qweight = torch.round(w / best_scale).clamp(-127, 127).to(torch.int8)
        self.scales = best_scale[:, 0].to(self.dtype)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for input that already is (rows, in_features)."""
        out = _in_dtype(torch.ops.aten._weight_int8pack_mm, x, self.dtype, self.qweight, self.scales)
        return out if self.bias is None else out + self.bias


class Int4Linear(nn.Module):
    """Weight-only INT4 in groups: each run of :attr:`GROUP` weights of an output as 4-bit steps between the
    group's least and largest weight (a scale and an offset per group, as llama.cpp's Q4_1 has them), through
    ``torch.ops.aten._weight_int4pack_mm_for_cpu``; the input and output keep the model's dtype, computed in
    :func:`kernel_dtype`'s.

    A model converted from a Q4_1 file holds weights that already lie on such
    steps, 16 to a group of 32: there the groups give those weights back,
    short only of rounding the scale and offset to the kernel's dtype. The
    kernel computes each row on its own, so a row comes out alike at every
    row count (:func:`pad_linears` checks it as any other layer).
    """

    GROUP = 32
    OUTPUTS = 16  # the kernel packs outputs in blocks of this many

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.dtype = kernel_dtype(weight.dtype)
        groups = weight.float().view(self.out_features, -1, self.GROUP)
        least, most = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((most - least) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        steps = torch.round((groups - least) / scale).clamp(0, 15).to(torch.int32)
        # The kernel's weight is (step - 8) * scale + offset: the offset is the group's middle step.
        scales_and_offsets = torch.cat((scale, least + 8 * scale), dim=-1).transpose(0, 1)
        self.scales_and_offsets = scales_and_offsets.to(self.dtype).contiguous()  # (groups, outputs, 2)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(steps.view(self.out_features, -1), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for input that already is (rows, in_features)."""
        out = _in_dtype(torch.ops.aten._weight_int4pack_mm_for_cpu, x, self.dtype, self.packed, self.GROUP,
                        self.scales_and_offsets)
        return out if self.bias is None else out + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weights the kernel computes with, (out_features, in_features) in float32."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return self.rows(eye).float().t()


def _in_dtype(kernel, x: torch.Tensor, dtype: torch.dtype, *args) -> torch.Tensor:
    """``kernel(x, *args)`` computed in ``dtype``, given and giving back ``x``'s."""
    if x.dtype == dtype:
        return kernel(x, *args)
    return kernel(x.to(dtype), *args).to(x.dtype)


QUANTIZED = {"int8": (Int8Linear, "INT8 weights (one scale per output)"),
             "int4": (Int4Linear, f"INT4 weights (a scale and an offset per {Int4Linear.GROUP} weights)")}


def quantize_linears(model: nn.Module, mode: str = "int8", head: nn.Module | None = None) -> str:
    """Swap every ``nn.Linear`` of a CPU model but ``head`` for an :class:`Int8Linear` or :class:`Int4Linear`
    (``mode``: a key of :data:`QUANTIZED`); say what was done. Call it after
    :func:`workers.fusion.fuse_projections` (stacking needs the plain weights), then :func:`pack_linears` for
    ``head``, which keeps the model's dtype: the vocabulary projection, whose rounding picks the token (a Q4_1
    file holds its layers in 4 bits, but that one in 8)."""
    kind, said = QUANTIZED[mode]
    first = next(model.parameters())
    if first.device.type != "cpu":
        return f"weights as loaded (quantized weights are for CPUs, not {first.device.type})"
    linears = [(parent, name, child) for parent, name, child in _linears(model)
               if isinstance(child, nn.Linear) and child is not head]
    if kind is Int4Linear and any(child.in_features % Int4Linear.GROUP or child.out_features % Int4Linear.OUTPUTS
                                  for _, _, child in linears):
        return (f"weights as loaded (INT4 takes inputs in whole groups of {Int4Linear.GROUP} and outputs in "
                f"{Int4Linear.OUTPUTS}s, not every layer's)")
    swaps = [(parent, name, kind(child)) for parent, name, child in linears]
    for parent, name, layer in swaps:
        setattr(parent, name, layer)
    computed = kernel_dtype(first.dtype)
    return f"{len(swaps)} linear layers with {said}" + (
        f" computed in {str(computed).removeprefix('torch.')}" if computed != first.dtype else "")


# The linear layers of this module, each with a ``rows`` method.
_OURS = (PackedLinear, PaddedRows, Int8Linear, Int4Linear, Float16Linear)


def on_rows(linear: nn.Module):
    """A function of (rows, in_features) input that computes ``linear``, without module call overhead where it can."""
    return linear.rows if isinstance(linear, _OURS) else linear


def _linears(module: nn.Module):
    """(parent, name, layer) of every linear layer below ``module``, a padded one as one layer."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Linear, *_OURS)):
            yield module, name, child
        else:
            yield from _linears(child)


def pack_linears(model: nn.Module, batch_hint: int, float16: bool = False) -> str:
    """Swap every ``nn.Linear`` of a CPU model for a :class:`PackedLinear`, or with ``float16`` for a
    :class:`Float16Linear` where the model computes in float32, FBGEMM is there and the layer's weights keep their
    values in float16 (:func:`float16_holds`); say what was done.

    Leaves the model as it was where oneDNN cannot take its dtype on this CPU
    (bfloat16 needs AVX-512 or AVX-NE-CONVERT) or where a packed layer does not
    agree with the plain one.
    """
    first = next(model.parameters())
    if first.device.type != "cpu":
        return f"plain linear layers ({first.device.type})"
    if not torch.backends.mkldnn.is_available():
        return "plain linear layers (torch built without oneDNN)"
    float16 = float16 and first.dtype == torch.float32 and float16_linears_available()
    swaps = []
    try:
        with torch.inference_mode():
            for parent, name, child in _linears(model):
                if isinstance(child, nn.Linear):
                    half = float16 and float16_holds(child.weight)
                    packed = Float16Linear(child) if half else PackedLinear(child, batch_hint)
                    x = torch.randn(3, child.in_features, dtype=first.dtype)
                    want, got = child(x).float(), packed(x).float()
                    tolerance = 1e-3 if first.dtype == torch.float32 else 3e-2
                    if not torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item()):
                        return "plain linear layers (packed ones disagreed with them)"
                    swaps.append((parent, name, packed))
    except RuntimeError as exc:
        return f"plain linear layers (oneDNN cannot pack {str(first.dtype).removeprefix('torch.')} here: {exc})"
    for parent, name, packed in swaps:
        setattr(parent, name, packed)
    halves = sum(isinstance(packed, Float16Linear) for _, _, packed in swaps)
    if not halves:
        return f"{len(swaps)} linear layers prepacked for oneDNN"
    rest = f", {len(swaps) - halves} prepacked for oneDNN" if halves < len(swaps) else ""
    return f"{halves} linear layers with float16 weights computed in float32 (FBGEMM){rest}"


def row_counts(rows: int, most_rows: int) -> list[int]:
    """The row counts a layer is measured at: every count up to ``rows`` (decoding rows), then
    doublings of it up to ``most_rows`` (a pass that also computes pieces of prompts)."""
    counts = list(range(1, rows + 1))
    while counts[-1] * 2 < most_rows:
        counts.append(counts[-1] * 2)
    return sorted({*counts, max(most_rows, rows)})


# Outputs compared per row count (enough for a rounding that strikes one output in 10,000), in at most so many rows.
_PROBE_OUTPUTS, _PROBE_ROWS = 1 << 18, 1024


# A tensor each of this module's layers holds with the device and dtype it computes in.
_COMPUTES_IN = {PackedLinear: "packed", Int8Linear: "scales", Int4Linear: "scales_and_offsets", Float16Linear: "probe"}


def _random_rows(layer: nn.Module, count: int, seed: int) -> torch.Tensor:
    """``count`` random input rows for ``layer``, on its device and in the dtype it computes in."""
    weight = getattr(layer, next((name for kind, name in _COMPUTES_IN.items() if isinstance(layer, kind)), "weight"))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(count, layer.in_features, generator=generator).to(weight.device, weight.dtype)


def least_rows(layer: nn.Module, counts: list[int], seed: int = 0, step: int = 1) -> int:
    """The fewest rows from which ``layer`` computes every row of a large random block alike at each of ``counts``
    (each padded to a multiple of ``step`` rows, as :class:`PaddedRows` pads it).

    The block is computed in groups of each count (every row of it, not only
    the first: a kernel may round differently in a few outputs of some rows),
    and each group is compared bit for bit with the same rows computed in
    groups of the largest count.
    """
    most = counts[-1]
    block = max(2 * most, min(-(-_PROBE_OUTPUTS // layer.out_features), _PROBE_ROWS))
    block = -(-block // most) * most  # whole groups of the largest count
    x = _random_rows(layer, block, seed)
    rows = on_rows(layer)

    def groups(count: int) -> torch.Tensor:
        pad = padded_count(count, 1, step) - count
        return torch.cat([rows(torch.cat((x[i:i + count], x[i:i + 1].expand(pad, -1))) if pad else x[i:i + count])
                          [:count] for i in range(0, block // count * count, count)])

    with torch.inference_mode():
        want = groups(most)
        least = most
        for count in reversed(counts[:-1]):
            got = groups(count)
            if not torch.equal(got, want[:len(got)]):
                break
            least = count
    return least


class RowRule(NamedTuple):
    """How many rows a linear layer is called on so that it rounds a row alike at every count: at least ``least``,
    and a multiple of ``step``; with ``most``, never more than ``most`` either (calls of ``most`` rows and one of
    the rest). With ``few``, a pass's first rows (:class:`PassRows`) are computed apart, in calls of at most ``few``
    rows, unpadded, and only the rest so."""
    least: int
    step: int = 1
    most: int = 0
    few: int = 0

    @property
    def pads(self) -> bool:
        """Whether the layer is wrapped (:class:`PaddedRows`): padded, or split."""
        return self.least > 1 or self.step > 1 or self.most > 0 or self.few > 0

    def __str__(self) -> str:
        if self.few:
            rows = f"{self.least} to {self.most}" if self.most else f"at least {self.least}"
            return f"decoding rows in calls of at most {self.few}, prompts' later rows in calls of {rows}"
        if self.most:
            return f"at most {self.most}"
        return str(self.least) if self.step == 1 else f"multiples of {self.step}"


# Multiples of these many rows are tried for a kind of layer that rounds alike from no few rows.
_STEPS = (2, 3, 4, 6, 8, 12, 14, 16)
# A kind of float16 layer whose rule pads a lone row to more rows than this is given float32 weights instead.
_MOST_FLOAT16_PADDING = 16
# What a call costs beyond its rows, as so many rows more: each call reads the layer's weights once. On the AMX CPU
# measured, the model's linear layers took 12.5 ms over one row, 57 ms over 256 rows (in one call each).
_CALL_ROWS = 64


def row_rule(layer: nn.Module, counts: list[int], decoding: int = 0, prompts: int = 0) -> RowRule:
    """The :class:`RowRule` that makes ``layer`` round alike at every one of ``counts`` and pads them least in all:
    the least rows, or, where that is more than two, a multiple of a few rows (the fewest that does it from the
    first, checked at every multiple up to the largest count) if that pads less.

    Given ``decoding`` (the most decoding rows of a pass), a rule that would
    pad a count of decoding rows gives way, where the layer rounds a row
    alike at every count of decoding rows (:func:`row_classes`), to the
    cheaper (:func:`call_cost`) of: calls of at most as many rows as it
    rounds so; and, given ``prompts`` (the most rows of prompts a pass
    computes), a pass's decoding rows (with its prompts' first positions:
    :class:`PassRows`) in calls of those few rows, and the other rows in calls
    within another range of counts that round alike (padded up to its least).
    """
    rules = [RowRule(least_rows(layer, counts))]
    if rules[0].least > 2:
        step = next((step for step in _STEPS if least_rows(layer, counts, step=step) <= step
                     and alike_at_multiples(layer, step, counts[-1])), None)
        rules += [RowRule(1, step)] if step else []
    rule = min(rules, key=lambda rule: sum(padded_count(count, rule.least, rule.step) for count in counts))
    if not any(padded_count(count, rule.least, rule.step) > count for count in range(1, decoding + 1)):
        return rule
    if least_rows(layer, list(range(1, decoding + 1))) > 1:
        return rule  # decoding rows round otherwise at some count of them
    top = max(counts[-1], decoding + prompts)
    runs = alike_runs(row_classes(layer, top))
    _, last, _ = runs[0]
    choices = [RowRule(1, 1, last)] if last < top else []
    if prompts:
        choices += [RowRule(least, 1, most if most < prompts else 0, last) for least, most, _ in runs[1:]]
    if not choices:
        return rule
    return min(choices, key=lambda choice: sum(call_cost(choice, d, n) for d in (0, decoding)
                                                for n in range(1, prompts + 1 if prompts else top - d + 1)))


def call_cost(rule: RowRule, decoding: int, prompts: int) -> int:
    """What a pass of ``decoding`` and ``prompts`` rows costs in a layer so called: the rows it computes, padding
    too, and :data:`_CALL_ROWS` for each call."""
    def split(n: int) -> tuple[int, int]:  # calls and rows for n rows, in calls of most and one of the rest
        if not n:
            return 0, 0
        calls = -(-n // rule.most) if rule.most else 1
        rest = n - (calls - 1) * rule.most if rule.most else n
        return calls, n - rest + padded_count(rest, rule.least, rule.step)

    if rule.few and decoding:
        calls, rows = split(prompts)
        return (calls + -(-decoding // rule.few)) * _CALL_ROWS + rows + decoding
    calls, rows = split(decoding + prompts)
    return calls * _CALL_ROWS + rows


def row_classes(layer: nn.Module, most: int, seed: int = 0) -> list[int]:
    """For each count of rows from 1 to ``most``, the least count that computes the rows of a large random block as
    it does (each in groups of its count, every row of the block): counts with one class round a row alike."""
    block = min(-(-_PROBE_OUTPUTS // layer.out_features), _PROBE_ROWS)
    x = _random_rows(layer, block + most, seed)
    rows = on_rows(layer)
    seen: list[tuple[int, torch.Tensor]] = []
    classes = []
    with torch.inference_mode():
        for count in range(1, most + 1):
            got = torch.cat([rows(x[i:i + count]) for i in range(0, block, count)])[:block]
            alike = next((first for first, out in seen if torch.equal(got, out)), None)
            if alike is None:
                seen.append((count, got))
            classes.append(alike or count)
    return classes


def alike_runs(classes: list[int]) -> list[tuple[int, int, int]]:
    """(first count, last count, class) of each run of counts with one class in ``classes`` (counts from 1)."""
    runs = []
    for count, cls in enumerate(classes, 1):
        if runs and runs[-1][2] == cls and runs[-1][1] == count - 1:
            runs[-1] = (runs[-1][0], count, cls)
        else:
            runs.append((count, count, cls))
    return runs


def alike_at_multiples(layer: nn.Module, step: int, most: int, seed: int = 1) -> bool:
    """Whether ``layer`` computes every row of a random block alike at each multiple of ``step`` rows up to
    ``most``: a kernel that works in blocks of rows may split one count otherwise than its neighbours."""
    top = padded_count(most, 1, step)
    x = _random_rows(layer, top, seed)
    rows = on_rows(layer)
    with torch.inference_mode():
        want = rows(x)
        return all(torch.equal(rows(x[:count]), want[:count]) for count in range(step, top, step))


def pad_linears(model: nn.Module, rows: int, most_rows: int, head: nn.Module | None = None,
                pass_rows: PassRows | None = None) -> dict[str, RowRule]:
    """Measure every kind of linear layer of ``model`` and pad those that round by row count; return
    ``{"<class> <in>x<out>": its row rule}`` for each kind.

    A pass computes up to ``rows`` decoding rows plus pieces of prompts, at
    most ``most_rows`` in all; the vocabulary projection ``head`` only ever
    sees the decoding rows. A kind that would pad decoding rows may be split
    into calls of at most some rows instead, or, given the runner's
    ``pass_rows``, compute them apart (:func:`row_rule`). Layers of one
    class and shape share a kernel, so one of each is measured. Calling this
    again measures again (the wrapped layer itself) and pads anew.
    """
    def kind_of(bare: nn.Module, is_head: bool) -> str:
        return f"{type(bare).__name__} {bare.in_features}x{bare.out_features}{' (head)' if is_head else ''}"

    found, swaps, widened = {}, [], set()
    prompts = most_rows - rows if pass_rows is not None else 0
    for parent, name, layer in _linears(model):
        bare = layer.layer if isinstance(layer, PaddedRows) else layer
        is_head = layer is head or bare is head
        kind, counts = kind_of(bare, is_head), row_counts(rows, rows if is_head else most_rows)
        if kind not in found and kind not in widened:
            rule = row_rule(bare, counts, rows, 0 if is_head else prompts)
            if isinstance(bare, Float16Linear) and not rule.few \
                    and padded_count(1, rule.least, rule.step) > _MOST_FLOAT16_PADDING:
                logger.warning("FBGEMM's float16 product rounds a row alike only from %d rows here (%s): float32 "
                               "weights for those layers instead", rule.least, kind)
                widened.add(kind)
            else:
                found[kind] = rule
        if kind in widened:
            bare = bare.widened(rows)
            kind = kind_of(bare, is_head)
            if kind not in found:
                found[kind] = row_rule(bare, counts, rows, 0 if is_head else prompts)
        swaps.append((parent, name, bare, found[kind]))
    for parent, name, bare, rule in swaps:
        setattr(parent, name, PaddedRows(bare, rule.least, rule.step, rule.most, rule.few, pass_rows)
                if rule.pads else bare)
    return found
