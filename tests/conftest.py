"""Shared fixtures. Real assets come from $SWEEP_CACHE (e.g. SWEEP_CACHE=../shared/assets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def assets_root() -> Path | None:
    """The real test assets (cache layout), or None when $SWEEP_CACHE does not hold them."""
    env = os.environ.get("SWEEP_CACHE")
    if not env:
        return None
    root = Path(env).expanduser().resolve()
    if (root / "weights" / "yolov5n.pt").is_file() and (root / "datasets" / "coco-val128").is_dir():
        return root
    return None


@pytest.fixture(scope="session")
def assets() -> Path:
    root = assets_root()
    if root is None:
        pytest.skip("real assets absent: set SWEEP_CACHE to a folder holding weights/yolov5n.pt "
                    "and datasets/coco-val128 (e.g. SWEEP_CACHE=../shared/assets)")
    return root


@pytest.fixture(scope="session")
def yolov5n_path(assets: Path) -> Path:
    return assets / "weights" / "yolov5n.pt"


@pytest.fixture(scope="session")
def val128_dir(assets: Path) -> Path:
    return assets / "datasets" / "coco-val128"


@pytest.fixture(scope="session")
def v5n(yolov5n_path):
    """The pristine pretrained yolov5n (unfused, FP32, eval); tests prune deep copies of it."""
    from sweep.model.checkpoint import load_checkpoint

    return load_checkpoint(yolov5n_path).model


@pytest.fixture(scope="session")
def v5n_fused(v5n):
    import copy

    from sweep.model.yolo import fuse

    return fuse(copy.deepcopy(v5n))
