"""Milliseconds per image of the loop's NMS and postprocess stages, the predictions JSON and the COCO
evaluation (faster-coco-eval): yolov5n on coco-val128, FP32, CPU. Prints one JSON line tagged with the
first argument (to compare checkouts: run it with PYTHONPATH set to each). Figures in docs/benchmarks.md.

    SWEEP_CACHE=../shared/assets PYTHONPATH=. .venv/bin/python benchmarks/postprocess.py new
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from sweep.assets import cache_root
from sweep.data import Dataset, load_ground_truth
from sweep.evaluate.coco import CocoEvaluator
from sweep.evaluate.loop import gc_paused, run_inference
from sweep.model.checkpoint import load_checkpoint
from sweep.model.yolo import fuse


def main() -> None:
    assets = cache_root(None)  # $SWEEP_CACHE, else the user cache, as the tool resolves it
    ck = load_checkpoint(assets / "weights" / "yolov5n.pt")
    model = fuse(copy.deepcopy(ck.model)).float().eval()
    ds = Dataset(assets / "datasets" / "coco-val128" / "images" / "val2017", names=ck.names, imgsz=640, batch=32,
                 stride=int(ck.stride.max()))
    gt, _ = load_ground_truth(ds)
    batches = list(ds.iter_batches())  # decoded once: the stages below do not include reading
    ev = CocoEvaluator(gt, backend="faster", image_ids=ds.image_ids, class_map=ds.class_map)
    with gc_paused():
        r = run_inference(model, batches, ev, device=torch.device("cpu"), half=False, conf=0.001, iou=0.65,
                          max_det=300)
        t = time.perf_counter()
        js = ev.predictions_json()
        t_json = time.perf_counter() - t
        t = time.perf_counter()
        res = ev.evaluate()
        t_coco = time.perf_counter() - t
    n = r.images
    print(json.dumps({"code": sys.argv[1] if len(sys.argv) > 1 else "", "ms_nms": r.seconds["nms"] / n * 1e3,
                      "ms_postprocess": r.seconds["postprocess"] / n * 1e3, "ms_json": t_json / n * 1e3,
                      "ms_coco_faster": t_coco / n * 1e3, "detections": r.detections,
                      "mAP50-95": res.stats["mAP50-95"], "json_bytes": len(js)}))


if __name__ == "__main__":
    main()
