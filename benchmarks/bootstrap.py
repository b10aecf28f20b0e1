"""Cost of eval.bootstrap: N image resamples of one COCO evaluation's per-image matching.

Evaluates a predictions JSON (val.py's format, e.g. a job's ``predictions.json`` from
``eval.save_json=true``) against its dataset once with pycocotools, then tiles that per-image
matching ``--copies`` times (128 images x 40 = 5120, about COCO val2017's 5000, with real
detection and ground-truth counts per image) and times the flattening (``match_table``) and the
resampled accumulate + summarize for ``--resamples`` resamples.

    SWEEP_CACHE=../shared/assets .venv/bin/python -m sweep model=yolov5n data=coco-val128 \
        eval.save_json=true mlflow.enabled=false hydra.run.dir=/tmp/b
    SWEEP_CACHE=../shared/assets .venv/bin/python benchmarks/bootstrap.py /tmp/b/predictions.json \
        --copies 40 --resamples 1000

Figures recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from sweep.config.resolve import resolve_job
from sweep.config.schema import register_configs
from sweep.evaluate import bootstrap as B
from sweep.evaluate import coco as C
from sweep.memo import ProcessMemo

REPO = Path(__file__).resolve().parents[1]


def tiled(ev, copies: int):
    """``ev.evalImgs`` and ``ev.params`` with every image repeated ``copies`` times ([K, A, I] layout kept)."""
    p = copy.deepcopy(ev.params)
    K, A, I = len(p.catIds), len(p.areaRng), len(p.imgIds)
    out = []
    for k in range(K):
        for a in range(A):
            block = ev.evalImgs[(k * A + a) * I:(k * A + a + 1) * I]
            out += block * copies
    p.imgIds = list(range(I * copies))
    return out, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", type=Path)
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--data", default="coco-val128")
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", f"data={args.data}", "mlflow.enabled=false"])
    memo = ProcessMemo()
    spec = resolve_job(cfg, memo)
    ckpt = memo.checkpoint(spec.model.weights, spec.model.sha256)
    data = memo.eval_data(spec.data, spec.eval, int(ckpt.stride.max()), ckpt.names, spec.model.weights)
    rows = json.loads(args.predictions.read_text())

    t = time.perf_counter()
    result, ev = C._pycocotools_eval(data.ground_truth, rows, list(data.image_ids))
    t_eval = time.perf_counter() - t
    evals, params = tiled(ev, args.copies)
    t = time.perf_counter()
    table = B.match_table(evals, params)
    t_table = time.perf_counter() - t
    t = time.perf_counter()
    stats = B.bootstrap_stats(table, args.resamples)
    t_boot = time.perf_counter() - t
    lo, hi = B.percentile_interval(stats)
    n_det = sum(len(e["dtScores"]) for e in evals if e is not None and e["aRng"] == params.areaRng[0])
    print(f"images {table.n_images}, detections {n_det} ({n_det / table.n_images:.0f}/image), "
          f"resamples {args.resamples}")
    print(f"pycocotools evaluate+accumulate of the {len(data.image_ids)} images: {t_eval:.1f} s")
    print(f"match_table {t_table:.1f} s, resampled accumulate + summarize {t_boot:.1f} s "
          f"({1000 * t_boot / args.resamples:.0f} ms per resample)")
    for name, a, b in zip(C.STAT_NAMES[:3], lo, hi):
        print(f"{name}: {result.stats[name]:.4f} [{a:.4f}, {b:.4f}]")


if __name__ == "__main__":
    main()
