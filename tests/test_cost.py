"""Accounting: sparsity definitions, parameter counts, GFLOPs, sizes, per-layer table."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
import torch.nn as nn
import zstandard

from sweep.cost import (
    LAYER_COLUMNS,
    MB,
    accounting,
    gflops,
    layer_table,
    param_counts,
    sizes_mb,
    sparsity_global,
    state_dict_bytes,
)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 216 weights
        nn.BatchNorm2d(8),                           # 8 + 8
        nn.SiLU(),
        nn.Conv2d(8, 4, 1),                          # 32 weights + 4 bias
    ).eval()


def test_sparsity_definitions_on_known_zeros():
    m = tiny()
    with torch.no_grad():
        m[0].weight[:2] = 0           # 2 filters * 27 = 54 zeros, whole filters
        m[3].weight.view(-1)[:8] = 0  # 8 zeros
        m[3].bias[0] = 0              # a zero outside any conv weight
        m[1].bias.zero_()             # BN beta: 8 zeros
    metrics, layers = accounting(m, ["0"], 32, sparsity_target=0.25)
    assert metrics["sparsity_target"] == 0.25
    assert metrics["sparsity"] == 54 / 216                      # selected conv weights only
    total = 216 + 16 + 32 + 4
    assert metrics["sparsity_global"] == pytest.approx((54 + 8 + 1 + 8) / total)
    assert metrics["params"] == total == sum(p.numel() for p in m.parameters())
    assert metrics["params_nonzero"] == total - (54 + 8 + 1 + 8)
    assert list(layers.columns) == LAYER_COLUMNS
    assert layers.to_dict("records") == [
        {"layer": "0", "selected": True, "shape": "8x3x3x3", "numel": 216, "zeros": 54,
         "sparsity": 0.25, "zero_filters": 2},
        {"layer": "3", "selected": False, "shape": "4x8x1x1", "numel": 32, "zeros": 8,
         "sparsity": 0.25, "zero_filters": 1},
    ]
    all_metrics, _ = accounting(m, None, 32)
    assert "sparsity_target" not in all_metrics
    assert all_metrics["sparsity"] == (54 + 8) / (216 + 32)


def test_sparsity_global_matches_yolov5_helper():
    m = tiny()
    with torch.no_grad():
        m[3].weight.view(-1)[:5] = 0
    a = b = 0
    for p in m.parameters():  # utils/torch_utils.py sparsity()
        a += p.numel()
        b += (p == 0).sum()
    assert sparsity_global(m) == pytest.approx(float(b / a))


def test_gflops_counts_two_flops_per_mac():
    conv = nn.Conv2d(3, 16, 3, padding=1)
    macs = 16 * 3 * 3 * 3 * 64 * 64
    assert gflops(conv, 64) == pytest.approx(2 * macs / 1e9)
    assert gflops(conv, (32, 64)) == pytest.approx(macs / 1e9)


def test_gflops_ignore_zeros_and_restores_training_mode():
    m = tiny().train()
    g = gflops(m, 64)
    assert m.training
    with torch.no_grad():
        m[0].weight.zero_()
    assert gflops(m, 64) == g


def test_sizes_dense_vs_compressed():
    m = nn.Conv2d(64, 64, 3)
    size, packed = sizes_mb(m)
    raw = state_dict_bytes(m)
    assert size == len(raw) / MB and MB == 1e6
    assert size == pytest.approx(4 * (64 * 64 * 9 + 64) / 1e6, rel=0.02)  # FP32 + pickle overhead
    assert zstandard.ZstdDecompressor().decompress(
        zstandard.ZstdCompressor(level=3).compress(raw)) == raw
    assert torch.load(io.BytesIO(raw), weights_only=True).keys() == m.state_dict().keys()
    with torch.no_grad():
        m.weight.view(-1)[: m.weight.numel() // 2] = 0
    size2, packed2 = sizes_mb(m)
    assert size2 == size          # zeros are stored dense
    assert packed2 < 0.7 * packed  # but compress


def test_param_counts():
    m = tiny()
    assert param_counts(m) == (268, 260)  # BatchNorm beta starts at zero: 8 zero parameters


def test_reference_ratios_and_unknown_layer():
    m = tiny()
    dense, _ = accounting(m, None, 32)
    metrics, _ = accounting(m, None, 32, reference=dense)
    assert metrics["params_ratio"] == 1.0 and metrics["gflops_ratio"] == 1.0
    with pytest.raises(ValueError, match="not Conv2d"):
        layer_table(m, ["1"])


def test_layer_table_is_csv_ready(tmp_path):
    _, layers = accounting(tiny(), None, 32)
    path = tmp_path / "layers.csv"
    layers.to_csv(path, index=False)
    back = pd.read_csv(path)
    assert list(back["layer"].astype(str)) == ["0", "3"]
    assert list(back["shape"]) == ["8x3x3x3", "4x8x1x1"]
