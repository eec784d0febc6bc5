"""Faster CPU linear layers, and a measurement of which batch sizes compute a row alike.

On CPU a plain ``nn.Linear`` calls the BLAS gemm every step, which repacks the
weights each call and switches kernels by the number of rows: on a 2-core
AVX2 machine a step of two rows took 1.6x one of one row, and one row
rounded differently from four. oneDNN can reorder a weight once into its
blocked layout, as ``torch.compile``'s CPU freezing does, through the same
``torch.ops.mkldnn`` operators used here. There a step is mostly the cost of
reading the weights once, whatever the rows.

Greedy text must not depend on what else shares a batch, so the engine pads
small batches to the fewest rows from which every larger batch computes each
row bit for bit the same; :func:`invariant_rows` measures that number on the
machine at hand rather than assuming it.
"""

from __future__ import annotations

import torch
from torch import nn


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


def on_rows(linear: nn.Module):
    """A function of (rows, in_features) input that computes ``linear``, without module call overhead where it can."""
    return linear.rows if isinstance(linear, PackedLinear) else linear


def _linears(model: nn.Module):
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, PackedLinear)):
                yield parent, name, child


def pack_linears(model: nn.Module, batch_hint: int) -> str:
    """Swap every ``nn.Linear`` of a CPU model for a :class:`PackedLinear`; say what was done.

    Leaves the model as it was where oneDNN cannot take its dtype on this CPU
    (bfloat16 needs AVX-512 or AVX-NE-CONVERT) or where a packed layer does not
    agree with the plain one.
    """
    first = next(model.parameters())
    if first.device.type != "cpu":
        return f"plain linear layers ({first.device.type})"
    if not torch.backends.mkldnn.is_available():
        return "plain linear layers (torch built without oneDNN)"
    swaps = []
    try:
        with torch.inference_mode():
            for parent, name, child in _linears(model):
                if isinstance(child, nn.Linear):
                    packed = PackedLinear(child, batch_hint)
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
    return f"{len(swaps)} linear layers prepacked for oneDNN"


def invariant_rows(model: nn.Module, max_rows: int, most_rows: int | None = None) -> int:
    """The fewest rows from which every batch up to ``most_rows`` computes each row exactly alike.

    Tried on every distinct linear layer shape of the model with random input,
    at every size up to ``max_rows`` (decoding rows) and at doublings of it up
    to ``most_rows`` (a pass that also computes pieces of prompts); a pass
    with fewer rows is padded up to this many.
    """
    most_rows = max(most_rows or max_rows, max_rows)
    sizes = list(range(1, max_rows + 1))
    while sizes[-1] * 2 < most_rows:
        sizes.append(sizes[-1] * 2)
    sizes = sorted({*sizes, most_rows}, reverse=True)
    seen, rows = set(), 1
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.inference_mode():
        for _, _, layer in _linears(model):
            shape = (layer.in_features, layer.out_features)
            if shape in seen:
                continue
            seen.add(shape)
            weight = layer.packed if isinstance(layer, PackedLinear) else layer.weight
            x = torch.randn(most_rows, layer.in_features, generator=generator).to(weight.device, weight.dtype)
            full = layer(x)
            m = most_rows
            for size in sizes[1:]:
                if not torch.equal(layer(x[:size].contiguous()), full[:size]):
                    break
                m = size
            rows = max(rows, m)
    return rows
