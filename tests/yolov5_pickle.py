"""Checkpoints pickled the way the YOLOv5 repository pickles them, without that repository.

``fake_yolov5_package`` registers importable classes named like YOLOv5's (``models.yolo.Model``,
``models.yolo.DetectionModel``, ``models.common.C3``, ``models.experimental.MixConv2d``...), so
``torch.save`` writes the same globals an official checkpoint has; ``official_style`` copies one
of our models into those classes with YOLOv5's attributes (``yaml``, ``names``, ``stride``,
``save``; Detect's ``stride`` as a plain attribute, not a buffer).
"""

from __future__ import annotations

import copy
import sys
import types

import torch
from torch import nn

from sweep.model import checkpoint as ck
from sweep.model import yolo as M

EXPERIMENTAL = ("MixConv2d",)  # lives in models/experimental.py in v6.x/v7.0


def fake_yolov5_package(monkeypatch) -> dict[str, type]:
    pkg, common, experimental, yolo = (types.ModuleType(n) for n in (
        "models", "models.common", "models.experimental", "models.yolo"))
    pkg.common, pkg.experimental, pkg.yolo = common, experimental, yolo
    classes = {}
    for name in ck._COMMON:
        where = experimental if name in EXPERIMENTAL else common
        classes[name] = type(name, (nn.Module,), {"__module__": where.__name__, "__qualname__": name})
        setattr(where, name, classes[name])
    for name in ("Model", "DetectionModel", "Detect", "SegmentationModel", "Segment", "ClassificationModel"):
        classes[name] = type(name, (nn.Module,), {"__module__": "models.yolo", "__qualname__": name})
        setattr(yolo, name, classes[name])
    for mod in (pkg, common, experimental, yolo):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return classes


def official_style(model: M.DetectionModel, classes: dict[str, type], legacy_anchor_grid: bool = False,
                   top: str = "Model", half: bool = True) -> nn.Module:
    """A copy of ``model`` as the YOLOv5 repo would pickle it (its classes, FP16 unless ``half=False``,
    yaml/names/stride attributes). ``top``: ``Model`` (v6.x) or ``DetectionModel`` (v7.0)."""

    def convert(module: nn.Module) -> nn.Module:
        cls = classes.get(type(module).__name__) if type(module).__module__.startswith("sweep.model.") else None
        new = cls.__new__(cls) if cls is not None else copy.copy(module)
        new.__dict__ = dict(module.__dict__)
        new._modules = {k: convert(v) for k, v in module._modules.items()}
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        return new

    seq = convert(copy.deepcopy(model.model))
    detect = seq[-1]
    detect._non_persistent_buffers_set = set()
    del detect._buffers["stride"]
    detect.stride = model.stride.clone()
    if legacy_anchor_grid:  # v5.0 registered this (pixels) as a persistent buffer
        detect._buffers["anchor_grid"] = (model.model[-1].anchors * model.model[-1].stride.view(-1, 1, 1)
                                          ).view(detect.nl, 1, -1, 1, 1, 2).clone()
    out = classes[top]()
    out.model = seq
    out.yaml = copy.deepcopy(model.yaml)
    out.stride = model.stride.clone()
    out.save = list(model.save)
    out.names = list(model.names)
    return out.half() if half else out


def release_checkpoint(pickled: nn.Module) -> dict:
    """The dict of a stripped release checkpoint (``strip_optimizer``: EMA moved to 'model')."""
    return {"epoch": -1, "best_fitness": None, "model": pickled, "ema": None, "updates": None,
            "optimizer": None, "wandb_id": None, "date": "2022-11-22T12:00:00"}


def training_checkpoint(model_pickled: nn.Module, ema_pickled: nn.Module, numpy_module) -> dict:
    """The dict train.py writes as last.pt / best.pt: model + EMA, SGD state, options, fitness."""
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.937, nesterov=True)
    params[0].sum().backward()
    params[1].grad = torch.zeros(4)
    opt.step()
    return {"epoch": 41, "best_fitness": numpy_module.array([0.3123]), "model": model_pickled, "ema": ema_pickled,
            "updates": 4242, "optimizer": opt.state_dict(),
            "opt": {"weights": "yolov5s.pt", "cfg": "", "data": "data/coco128.yaml", "epochs": 100, "batch_size": 16,
                    "imgsz": 640, "hyp": {"lr0": 0.01, "momentum": 0.937, "weight_decay": 0.0005},
                    "save_dir": "runs/train/exp", "noval": False, "device": ""},
            "git": {"remote": "https://github.com/ultralytics/yolov5", "branch": "master", "commit": "915bbf2"},
            "date": "2023-01-10T09:30:00"}
