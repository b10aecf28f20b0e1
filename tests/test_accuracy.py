"""Pinned accuracy of pruned yolov5n on coco-val128 (imgsz 640, FP32 CPU): the figures the
pruning and recovery issues quote. Slow (full 128 images per point): run with -m slow.

Values come from running this code; the issues' independent figures are 0.116 (tutorial, pruned
after fusion), 0.216 (pruned unfused), 0.265 / 0.172 (unfused + BN recalibration at 0.3 / 0.5).
"""

from __future__ import annotations

import pytest
from helpers import make_cfg

from sweep.job import JobContext, run_job
from sweep.memo import ProcessMemo

pytestmark = pytest.mark.slow

CACHE = ProcessMemo()


@pytest.mark.parametrize("overrides,expected", [
    (("sparsity=0.3",), 0.116),                                             # the tutorial: after fusion
    (("sparsity=0.3", "prune.fused=false"), 0.216),                         # unfused weights pruned
    (("sparsity=0.3", "prune.fused=false", "recover=bn"), 0.263),
    (("sparsity=0.5", "prune.fused=false", "recover=bn"), 0.177),
])
def test_pruned_yolov5n_map(tmp_path, assets, overrides, expected):
    cfg = make_cfg(tmp_path, "model=yolov5n", "data=coco-val128", "mlflow.enabled=false", *overrides)
    out = run_job(cfg, JobContext(tmp_path / "job"), CACHE)
    assert round(out.metrics["mAP50-95"], 3) == expected
