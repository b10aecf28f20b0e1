"""CPU measurement of fine-tuning recovery (issue #13), to compare with ../shared/REFERENCE-FIGURES.md.

yolov5n, per-layer L1 (``torch.nn.utils.prune.l1_unstructured`` on every Conv2d of the UNFUSED
model, made permanent) at each sparsity; BatchNorm recalibration on coco128-calib (cumulative
average, batch 16, 640 letterbox); then YOLOv5's recipe (:func:`sweep.recover.finetune.finetune`,
hyp.scratch-low, batch 16 accumulated to 64, mosaic augmentation) on coco128 for each requested
number of epochs (each a separate run from the recalibrated model, since the LR schedule depends on
the total); the EMA weights, rounded through FP16 as YOLOv5 saves them (``--no-fp16-save`` to
skip), fused and evaluated on coco-val128 like val.py (640, batch 32, conf 0.001, iou 0.65, rect).

    SWEEP_CACHE=../shared/assets .venv/bin/python benchmarks/finetune.py [--sparsity 0.3 0.5] [--epochs 1 3]

Prints a markdown table (mAP50-95 / mAP50 per stage) and the wall time of each stage.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.utils.prune as tprune

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sweep.data import Dataset, coco_ground_truth  # noqa: E402
from sweep.data.train import TrainLoader  # noqa: E402
from sweep.model import fuse, load_checkpoint  # noqa: E402
from sweep.recover.finetune import finetune  # noqa: E402
from sweep.recover.methods import recalibrate_batchnorm  # noqa: E402


def prune_l1_unfused(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            tprune.l1_unstructured(m, "weight", amount=sparsity)
            tprune.remove(m, "weight")
    return model


def conv_sparsity(model: torch.nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


class Evaluator:
    """coco-val128 as val.py evaluates it, through the project's building blocks (old or new API)."""

    def __init__(self, val_dir: Path):
        self.ds = Dataset(val_dir / "images" / "val2017", imgsz=640, batch=32, rect=True, workers=2)
        self.gt = coco_ground_truth(self.ds)
        self.batches = list(self.ds.iter_batches())  # decoded once, reused by every evaluation

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from sweep.evaluate import CocoEvaluator, run_inference

        model = fuse(copy.deepcopy(model)).float().eval()
        kw = dict(device=torch.device("cpu"), half=False, conf=0.001, iou=0.65, max_det=300)
        ev_kw = dict(backend="pycocotools", image_ids=self.ds.image_ids)
        if "class_map" in inspect.signature(run_inference).parameters:
            kw["class_map"] = self.ds.class_map
        elif "class_map" in inspect.signature(CocoEvaluator).parameters:
            ev_kw["class_map"] = self.ds.class_map
        evaluator = CocoEvaluator(self.gt, **ev_kw)
        with torch.inference_mode():
            run_inference(model, iter(self.batches), evaluator, **kw)
        res = evaluator.evaluate() if hasattr(evaluator, "evaluate") else evaluator.compute()
        return {k: res.stats[k] for k in ("mAP50-95", "mAP50", "AR100")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=os.environ.get("SWEEP_CACHE", "../shared/assets"))
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.5])
    ap.add_argument("--epochs", type=int, nargs="+", default=[1])
    ap.add_argument("--iters", type=int, default=None, help="cap on training batches per run")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--no-fp16-save", action="store_true")
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model (pinned 0.343)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()

    cache = Path(args.cache)
    t_start = time.perf_counter()
    base = load_checkpoint(cache / "weights" / "yolov5n.pt").model.float().eval()
    evaluate = Evaluator(cache / "datasets" / "coco-val128")
    calib = Dataset(cache / "datasets" / "coco128-calib" / "images" / "train2017", imgsz=640, batch=16, rect=False,
                    labels=False, workers=2)
    loader = TrainLoader(cache / "datasets" / "coco128" / "images" / "train2017", imgsz=args.imgsz,
                         batch=args.batch, augment=not args.no_augment, seed=args.seed, workers=2, cache=True)
    rows: list[dict] = []

    def record(stage: str, sparsity: float, model: torch.nn.Module, seconds: float, extra: dict | None = None):
        t0 = time.perf_counter()
        m = evaluate(model)
        row = {"sparsity": sparsity, "stage": stage, **m, "sparsity_measured": conv_sparsity(model),
               "seconds": seconds, "eval_seconds": time.perf_counter() - t0, **(extra or {})}
        rows.append(row)
        print(f"[{time.perf_counter() - t_start:7.1f}s] s={sparsity:.1f} {stage:>12}: mAP50-95 {m['mAP50-95']:.4f} "
              f"mAP50 {m['mAP50']:.4f} AR100 {m['AR100']:.4f} (sparsity {row['sparsity_measured']:.4f}, "
              f"{seconds:.1f}s + eval {row['eval_seconds']:.1f}s)", flush=True)

    if args.dense:
        record("dense", 0.0, base, 0.0)
    for s in args.sparsity:
        model = prune_l1_unfused(copy.deepcopy(base), s)
        t0 = time.perf_counter()
        seen = recalibrate_batchnorm(model, (b.images for b in calib.iter_batches()))
        record("bn", s, model, time.perf_counter() - t0, {"images": seen})
        for epochs in args.epochs:
            tuned = copy.deepcopy(model)
            curve: list[tuple[int, dict]] = []
            m = finetune(tuned, loader, batch=args.batch, epochs=epochs, iters=args.iters, imgsz=args.imgsz,
                         progress=True, on_step=lambda ni, x: curve.append((ni, x)))
            if not args.no_fp16_save:
                tuned.half().float()  # YOLOv5 saves the EMA in FP16; val.py loads it back as FP32 on the CPU
            first, last = curve[0][1], curve[-1][1]
            print(f"    loss {first['loss']:.4f} -> {last['loss']:.4f} over {len(curve)} iterations, "
                  f"{int(m['recover_steps'])} optimizer steps, bias lr {first['lr0']:.4f} -> {last['lr0']:.4f}, "
                  f"weight lr {first['lr1']:.2e} -> {last['lr1']:.2e}", flush=True)
            record(f"+{epochs} epoch" + ("s" if epochs > 1 else ""), s, tuned, m["recover_seconds"],
                   {k: m[k] for k in ("recover_images", "recover_iters", "recover_steps", "finetune_loss")})

    total = time.perf_counter() - t_start
    print("\n| sparsity | stage | mAP50-95 | mAP50 | AR100 | measured sparsity | stage s | eval s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sparsity']:.1f} | {r['stage']} | {r['mAP50-95']:.3f} | {r['mAP50']:.3f} | {r['AR100']:.3f} | "
              f"{r['sparsity_measured']:.4f} | {r['seconds']:.1f} | {r['eval_seconds']:.1f} |")
    print(f"\ntotal wall time {total:.0f}s on {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "total_seconds": total, "args": vars(args)}, indent=2,
                                        default=str))


if __name__ == "__main__":
    main()
