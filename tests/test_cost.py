"""Accounting: sparsity definitions, parameter counts, GFLOPs, sizes, per-layer table."""

from __future__ import annotations

import io

import pandas as pd
import pytest
import torch
import torch.nn as nn
import zstandard

from sweep.prune.accounting import (
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


# --------------------------------------------------------------------------- real yolov5n


# v5n / v5n_fused fixtures: tests/conftest.py


@pytest.fixture(scope="module")
def dense_fused(v5n_fused):
    return accounting(v5n_fused, None, 640, 0.0)


def test_real_accounting_unfused(v5n):
    metrics, layers = accounting(v5n, None, 640, 0.0)
    assert metrics["params"] == 1_872_157  # the official count (unfused, BN included)
    assert metrics["params_nonzero"] == 1_872_156  # one exact zero in model.21.conv
    assert metrics["sparsity"] == 1 / 1_861_888
    assert metrics["sparsity_global"] == 1 / 1_872_157
    assert metrics["gflops"] == pytest.approx(4.4681216, rel=1e-9)  # BN not counted: same as fused
    assert metrics["size_mb"] == pytest.approx(7.641, rel=2e-3)  # FP32 state_dict incl. BN buffers
    # FP16 checkpoint values upcast to FP32 have 13 zero mantissa bits: they compress well.
    assert 4.0 < metrics["size_mb_compressed"] < 5.0


def test_real_accounting_fused_matches_yolov5(dense_fused):
    metrics, layers = dense_fused
    assert metrics["params"] == 1_867_405  # YOLOv5 prints 1867405 parameters for fused yolov5n
    assert round(metrics["gflops"], 1) == 4.5  # and 4.5 GFLOPs (thop MACs*2 at 640)
    assert metrics["gflops"] == pytest.approx(4.4681216, rel=1e-9)
    assert metrics["size_mb"] == pytest.approx(7.514, rel=2e-3)
    assert 6.0 < metrics["size_mb_compressed"] < 7.2  # folded FP32 weights barely compress
    assert len(layers) == 60 and layers["selected"].all()
    assert layers["numel"].sum() == 1_861_888
    assert layers.iloc[0][["layer", "shape"]].tolist() == ["model.0.conv", "16x3x6x6"]
    assert layers.iloc[-1][["layer", "shape"]].tolist() == ["model.24.m.2", "255x256x1x1"]
    assert list(layers["layer"])[:3] == ["model.0.conv", "model.1.conv", "model.2.cv1.conv"]


def test_real_gflops_scale_with_image_area(v5n_fused):
    assert gflops(v5n_fused, 320) * 4 == pytest.approx(4.4681216, rel=1e-9)
    assert gflops(v5n_fused, (320, 640)) * 2 == pytest.approx(4.4681216, rel=1e-9)


def test_real_accounting_after_l1_pruning(v5n_fused, dense_fused):
    import copy

    from sweep.config.spec import PruneSpec
    from sweep.prune.methods import PRUNERS, select_convs

    dense, _ = dense_fused
    model = PRUNERS["l1_unstructured"](copy.deepcopy(v5n_fused), 0.3, PruneSpec("l1_unstructured"))
    metrics, layers = accounting(model, None, 640, 0.3, reference=dense)
    zeros = sum(round(0.3 * n) for n in layers["numel"])
    assert metrics["sparsity"] == zeros / 1_861_888 == pytest.approx(0.3, abs=1e-6)
    assert metrics["params_nonzero"] == 1_867_405 - zeros == 1_308_839
    assert metrics["sparsity_global"] == pytest.approx(zeros / 1_867_405)  # biases not pruned
    # Dense zeros: same parameter count, FLOPs and file size; only compression sees them.
    assert (metrics["params"], metrics["gflops"], metrics["size_mb"]) == (
        dense["params"], dense["gflops"], dense["size_mb"])
    assert metrics["params_ratio"] == 1.0 and metrics["gflops_ratio"] == 1.0
    assert metrics["size_mb_compressed"] < 0.85 * dense["size_mb_compressed"]
    assert (layers["sparsity"] - 0.3).abs().max() < 1e-3

    kept = PRUNERS["l1_unstructured"](copy.deepcopy(v5n_fused), 0.3, PruneSpec("l1_unstructured", exclude=("model.24.*",)))
    selected = list(select_convs(kept, [], ["model.24.*"]))
    m2, l2 = accounting(kept, selected, 640, 0.3)
    assert m2["sparsity"] == pytest.approx(0.3, abs=1e-6)  # over the selected layers only
    assert m2["sparsity_global"] < 0.29  # the dense head dilutes the global figure
    assert (~l2["selected"]).sum() == 3 and (l2[~l2["selected"]]["zeros"] == 0).all()


def test_a_pruned_model_of_the_dense_shapes_reuses_the_dense_count_and_channel_pruning_counts_anew(v5n_fused,
                                                                                                     dense_fused):
    """The job's accounting reuses the dense GFLOPs when every shape is the dense model's (zeros do not change
    a count) and counts again otherwise; sizes can be left to the caller (computed off the critical path)."""
    import copy

    from sweep.config.spec import PruneSpec
    from sweep.prune.methods import PRUNERS

    dense, _ = dense_fused
    zeros = PRUNERS["l1_unstructured"](copy.deepcopy(v5n_fused), 0.5, PruneSpec("l1_unstructured"))
    m, _ = accounting(zeros, None, 640, 0.5, reference=dense | {"gflops": 123.0}, reference_model=v5n_fused,
                      sizes=False)
    assert m["gflops"] == 123.0  # taken from the reference, not counted (the marker value proves it)
    assert gflops(zeros, 640) == dense["gflops"]  # and what counting would give is the same
    assert "size_mb" not in m and "size_mb_compressed" not in m
    thin = PRUNERS["channel"](copy.deepcopy(v5n_fused), 0.3, PruneSpec("channel"))
    m2, _ = accounting(thin, None, 640, 0.3, reference=dense, reference_model=v5n_fused)
    assert m2["gflops"] == gflops(thin, 640) < 0.6 * dense["gflops"]
    assert sizes_mb(thin.state_dict()) == (m2["size_mb"], m2["size_mb_compressed"])  # a state_dict sizes alike


def test_flops_counted_on_the_meta_device_equal_a_real_forward_pass(yolov5n_path):
    """gflops() runs on PyTorch's meta device (no arithmetic): the count must be the real pass's, for the
    official model unfused and fused and channel-pruned (the meta path must not be silently skipped)."""
    import copy

    from sweep.config.spec import PruneSpec
    from sweep.model import fuse, load_checkpoint
    from sweep.prune import PRUNERS
    from sweep.prune.accounting import _count_flops

    raw = load_checkpoint(yolov5n_path).model.float().eval()
    fused = fuse(copy.deepcopy(raw))
    channel = PRUNERS["channel"](copy.deepcopy(fused), 0.5, PruneSpec("channel"))
    for model in (raw, fused, channel):
        on_meta = _count_flops(model, torch.zeros(1, 3, 320, 320, device="meta"), meta=True)
        real = _count_flops(model, torch.zeros(1, 3, 320, 320), meta=False)
        assert on_meta == real > 0
        # gflops() itself takes the meta path (its fallback to a real pass would hide a meta failure)
        seen: list[str] = []
        hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].device.type))
        try:
            assert gflops(model, 320) == real
        finally:
            hook.remove()
        assert seen == ["meta"]
