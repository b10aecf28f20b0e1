"""Stage-split cost of evaluation jobs versus the pure forward-pass floor.

Runs K sparsity points of one model in ONE process (as the default sequential launcher
does) and prints, per point, the wall time split by stage (weights, data decode, prune,
inference, NMS, COCO eval, logging, ...) next to the time of the pure forward passes over
the same letterboxed images. Also reports process start-up (imports) once.

    SWEEP_CACHE=../shared/assets .venv/bin/python benchmarks/stages.py \
        --model yolov5n --data coco-val128 --points 0,0.3,0.5,0.7

Extra Hydra overrides go after ``--``, e.g. ``-- eval.backend=faster mlflow.enabled=false``.
Figures recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from sweep.config import register_configs  # noqa: E402
from sweep.config.resolve import resolve_job  # noqa: E402
from sweep.job import JobContext, run_job  # noqa: E402
from sweep.memo import ProcessMemo  # noqa: E402
from sweep.evaluate.timing import sync  # noqa: E402
from sweep.model import fuse  # noqa: E402
from sweep.process import setup_process  # noqa: E402

T_IMPORTED = time.perf_counter()
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@torch.inference_mode()
def forward_floor(memo: ProcessMemo, cfg) -> float:
    """Seconds of pure model forward passes over the dataset's (already decoded) batches (best of 2), on the
    job's device and in its precision (FP16 on CUDA), the batches already there: the floor a job's own
    ``seconds_forward`` is compared with."""
    spec = resolve_job(cfg, memo)
    device, half = torch.device(spec.eval.device), spec.eval.half
    ckpt = memo.checkpoint(spec.model.weights, spec.model.sha256)
    model = fuse(copy.deepcopy(ckpt.model).float().eval()).to(device)
    model = model.half() if half else model
    data = memo.eval_data(spec.data, spec.eval, int(ckpt.stride.max()), ckpt.names, spec.model.weights)
    inputs = [b.images.to(device) for b in memo.batches(data, spec.eval.preprocessed)]
    inputs = [(x.half() if half else x.float()) / 255 for x in inputs]
    passes = []
    for _ in range(2):  # the CPU's speed drifts by 10-15% between passes: keep the faster one
        sync(device)
        t0 = time.perf_counter()
        for x in inputs:
            model(x)
        sync(device)
        passes.append(time.perf_counter() - t0)
    return min(passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--data", default="coco-val128")
    ap.add_argument("--points", default="0,0.3,0.5,0.7")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    register_configs()
    setup_process()  # as the entry point does: host-memory reuse, bounded MLflow HTTP retries
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    rows = []
    memo = ProcessMemo()
    t_sweep = time.perf_counter()
    for i, s in enumerate(args.points.split(",")):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=[f"model={args.model}", f"data={args.data}", f"sparsity={s}",
                                               f"paths.outputs={tmp}", "eval.progress=false", "eval.latency=false",
                                               *args.overrides])
        t0 = time.perf_counter()
        out = run_job(cfg, JobContext(tmp / f"job{i}"), memo)
        wall = time.perf_counter() - t0
        m = out.metrics
        rows.append({"sparsity": float(s), "wall_s": wall, **{k: v for k, v in m.items() if k.startswith("seconds_")},
                     "mAP50-95": m.get("mAP50-95")})
    sweep_s = time.perf_counter() - t_sweep
    floor = forward_floor(memo, cfg)
    print(f"start-up (interpreter + imports): {T_IMPORTED - T_START:.2f} s")
    print(f"forward-pass floor per point (pure model(x) over the decoded batches): {floor:.2f} s")
    keys = ["load_model", "data", "prune", "accounting", "data_wait", "preprocess", "forward", "nms", "postprocess",
            "coco_eval", "coco_wait", "logging"]
    print(f"{'point':>6} {'wall':>7} {'x floor':>8} {'x own fw':>8} " + " ".join(f"{k[:10]:>10}" for k in keys))
    for r in rows:
        own = r.get("seconds_forward") or floor
        print(f"{r['sparsity']:>6.2f} {r['wall_s']:>7.2f} {r['wall_s'] / floor:>8.2f} {r['wall_s'] / own:>8.2f} "
              + " ".join(f"{r.get('seconds_' + k, 0.0):>10.2f}" for k in keys))
    print("x floor: point wall / best separate forward pass; x own fw: point wall / that job's own forward seconds")
    total = sweep_s + (T_IMPORTED - T_START)
    print(f"start-up + sweep loop: {total:.2f} s for {len(rows)} points = "
          f"{total / (floor * len(rows)):.2f} x the forward floor")
    if args.json:
        args.json.write_text(json.dumps({"startup_s": T_IMPORTED - T_START, "floor_s": floor, "points": rows,
                                         "total_s": total, "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
