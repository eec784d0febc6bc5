"""Prepacked linear layers and the measured row count below which a batch rounds differently."""

from __future__ import annotations

import torch
from torch import nn

from workers.kernels import PackedLinear, invariant_rows, pack_linears


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


def test_from_the_measured_rows_on_a_row_computes_alike_in_any_batch():
    for pack in (False, True):
        model = small_model()
        if pack:
            pack_linears(model, 16)
        least = invariant_rows(model, 16)
        assert 1 <= least <= 16
        x = torch.randn(16, 64)
        with torch.inference_mode():
            full = model(x)
            assert all(torch.equal(model(x[:m]), full[:m]) for m in range(least, 17))


class RowByRow(nn.Linear):
    """Each row on its own: alike in any batch by construction."""

    def forward(self, x):
        return torch.cat([super(RowByRow, self).forward(row[None]) for row in x])


class RoundsOffBelowThreeRows(RowByRow):
    def forward(self, x):
        out = super().forward(x)
        return out + 1e-3 if x.shape[0] < 3 else out


def test_invariant_rows_finds_where_rounding_stops_changing():
    assert invariant_rows(nn.Sequential(RowByRow(8, 8)), 8) == 1
    assert invariant_rows(nn.Sequential(RowByRow(8, 8), RoundsOffBelowThreeRows(8, 4)), 8) == 3


def test_a_model_without_linear_layers_is_left_alone():
    model = nn.Sequential(nn.ReLU(), nn.Embedding(10, 4))
    assert pack_linears(model, 16) == "0 linear layers prepacked for oneDNN"
