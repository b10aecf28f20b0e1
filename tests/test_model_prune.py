"""Pruning and fusion on the modules beyond the P5 release models: depth-wise and transposed
convolutions, Ghost, CrossConv/C3x, C3TR, BottleneckCSP, a plain BatchNorm2d layer.

The unstructured/structured methods (the tutorial's) prune ``nn.Conv2d`` weights only: transposed
convolutions (DWConvTranspose2d, nn.ConvTranspose2d) are not Conv2d and keep their weights, as
``torch.nn.utils.prune`` on the tutorial's ``nn.Conv2d`` selection leaves them. ``prune=channel``
removes channels of dense, depth-wise and transposed convolutions, keeps a transformer's width,
and refuses, naming the layer, grouped convolutions that are neither dense nor depth-wise and
Contract/Expand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from sweep.config.schema import ConfigError
from sweep.config.spec import PruneSpec
from sweep.model import fuse, load_checkpoint, save_checkpoint
from sweep.model.yolo import build_model, count_params, load_model_yaml
from sweep.prune.methods import PRUNERS

DATA = Path(__file__).parent / "data" / "models"
X = torch.rand(1, 3, 128, 160)


def zoo(name: str) -> nn.Module:
    return build_model(load_model_yaml(DATA / f"{name}.yaml"))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)[0]


def convs_consistent(model: nn.Module) -> None:
    """Every depth-wise conv is still depth-wise; BatchNorms match their conv."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.groups > 1:
            assert m.groups == m.in_channels == m.out_channels, name


@pytest.fixture(scope="module")
def prunable() -> nn.Module:
    return zoo("prunable-modules")


@pytest.mark.parametrize("fused", [True, False])
def test_channel_pruning_on_depthwise_transposed_ghost_and_transformer(prunable, fused, tmp_path):
    model = copy.deepcopy(prunable)
    if fused:
        fuse(model)
    before = count_params(model)
    dense_shape = outputs(model).shape
    transformer = model.model[10].m
    PRUNERS["channel"](model, 0.3, PruneSpec("channel", fused=fused))
    assert count_params(model) < 0.7 * before
    assert outputs(model).shape == dense_shape  # the Detect outputs keep 3 * (5 + nc) per cell
    convs_consistent(model)
    assert model.model[14].out_channels < 128 and model.model[14].groups == model.model[14].out_channels  # DWConvT
    assert model.model[17].out_channels < 64  # nn.ConvTranspose2d
    assert model.model[7].conv.out_channels < 64  # stride-2 DWConv
    assert model.model[1].cv2.conv.out_channels < 32  # GhostConv's depth-wise half
    # C3TR: the transformer (and the conv feeding it) keep their width; the other branch shrinks
    assert transformer.tr[0].ma.embed_dim == 128 and transformer.linear.in_features == 128
    assert model.model[10].cv1.conv.out_channels == 128 and model.model[10].cv2.conv.out_channels < 128
    # the pruned model saves and loads back with its shapes (transposed convs included)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "pruned.pt")).model
    assert count_params(loaded) == count_params(model)
    torch.testing.assert_close(outputs(loaded), outputs(model), rtol=1e-5, atol=1e-4)


def test_channel_pruning_refuses_grouped_convs_and_reshapes_by_name():
    model = zoo("all-modules")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        PRUNERS["channel"](model, 0.3, PruneSpec("channel"))
    message = str(err.value)
    assert "prune=channel cannot remove channels around model.6.m.0 (Conv2d, groups=2, 64 -> 22" in message
    assert "(and 3 more)" in message and "l1_unstructured" in message
    after = model.state_dict()  # refused before anything changed
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("method", ["l1_unstructured", "global_l1", "random", "ln_structured"])
def test_weight_methods_prune_conv2d_only(prunable, method):
    model = fuse(copy.deepcopy(prunable))
    transposed = {n: m.weight.detach().clone() for n, m in model.named_modules()
                  if isinstance(m, nn.ConvTranspose2d)}
    PRUNERS[method](model, 0.5, PruneSpec(method))
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert zeros == pytest.approx(0.5, abs=0.02)
    for name, weight in transposed.items():  # transposed convolutions are not Conv2d: untouched
        assert torch.equal(model.get_submodule(name).weight, weight), name
    assert torch.isfinite(outputs(model)).all()


@pytest.mark.assets
@pytest.mark.parametrize("method", ["l1_unstructured", "global_l1", "random", "ln_structured", "channel"])
def test_every_method_runs_on_yolov5n_7_k5(assets, method):
    path = assets / "weights" / "yolov5n-7-k5.pt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    model = fuse(copy.deepcopy(load_checkpoint(path).model))
    dense = outputs(model)
    PRUNERS[method](model, 0.3, PruneSpec(method))
    pruned = outputs(model)
    assert pruned.shape == dense.shape and torch.isfinite(pruned).all()
    convs_consistent(model)
    if method == "channel":
        assert count_params(model) < 0.6 * 1_498_813
        assert model.model[11].out_channels < 128  # DWConvTranspose2d shrank with its neighbours
    else:
        w = model.model[2].m[0].cv1.conv.weight
        assert (w == 0).float().mean().item() == pytest.approx(0.3, abs=0.02 if method != "global_l1" else 0.3)
