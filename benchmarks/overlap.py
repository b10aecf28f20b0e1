"""A sequential sweep with and without the overlapped pipeline, as a timeline (issue #18).

Runs the same K points of one model twice in ONE process, as the default sequential launcher does:

- ``serial``: every job evaluates its COCO numbers in its own process before it returns
  (``eval.coco_worker=false``, no deferred completion): load, prune, forward, COCO, one after the other;
- ``overlapped``: the COCO evaluation runs in the worker process and each job's completion waits until the
  next point's forward pass is done (what ``python -m sweep -m`` does).

Prints per point the forward seconds, the COCO seconds and how long the job waited for them, the accounting
seconds, and per mode the sweep's wall time against the sum of its forward passes; draws both timelines.

    SWEEP_CACHE=../shared/assets .venv/bin/python benchmarks/overlap.py \\
        --points 0,0.3,0.5,0.7 --figure docs/img/overlap_timeline.png

Extra Hydra overrides go after ``--``. Figures recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from sweep.config import register_configs
from sweep.job import JobContext, run_job
from sweep.memo import ProcessMemo
from sweep.process import setup_process

CONF = str(Path(__file__).resolve().parents[1] / "conf")
MODES = ("serial", "overlapped")


def run_mode(mode: str, args: argparse.Namespace, out: Path) -> dict:
    """The K points in this process; returns per-point spans (seconds since the mode's start) and figures."""
    memo = ProcessMemo()
    memo.defer_completion = mode == "overlapped"
    worker = "true" if mode == "overlapped" else "false"
    starts: list[tuple[float, float]] = []
    t0 = time.time()
    for i, s in enumerate(args.points.split(",")):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose("config", overrides=[f"model={args.model}", f"data={args.data}", f"sparsity={s}",
                                               f"paths.outputs={out}", "mlflow.enabled=false", "eval.progress=false",
                                               f"eval.coco_worker={worker}", *args.overrides])
        a = time.time()
        run_job(cfg, JobContext(out / mode / str(i), sweep_id=f"bench-{mode}"), memo)
        starts.append((a, time.time()))
    memo.complete_deferred()  # the sweep's end (the callback's on_multirun_end)
    wall = time.time() - t0
    points = []
    for i, (a, b) in enumerate(starts):
        folder = out / mode / str(i)
        tl = json.loads((folder / "timeline.json").read_text())
        m = json.loads((folder / "metrics.json").read_text())
        points.append({
            "sparsity": m["sparsity_target"], "mAP50-95": m["mAP50-95"],
            "job": (a - t0, b - t0), "forward": tuple(x - t0 for x in tl["forward"]),
            "coco": tuple(x - t0 for x in tl["coco_eval"]), "completed": tl["completed"] - t0,
            "where": tl["coco_where"], "forward_s": tl["forward"][1] - tl["forward"][0],
            "coco_s": m["seconds_coco_eval"], "coco_wait_s": m["seconds_coco_wait"],
            "accounting_s": m["seconds_accounting"], "data_wait_s": m.get("seconds_data_wait", 0.0)})
    return {"wall_s": wall, "forward_sum_s": sum(p["forward_s"] for p in points), "points": points}


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 1.2 + 1.1 * len(results) * 2), sharex=True)
    for ax, (mode, r) in zip(axes, results.items()):
        for row, p in enumerate(r["points"]):
            y = len(r["points"]) - 1 - row
            end = max(p["job"][1], p["completed"])
            ax.broken_barh([(p["job"][0], end - p["job"][0])], (y - 0.4, 0.8), color="#dddddd",
                           label="job (until completed: its run ended, its outcome written)")
            ax.broken_barh([(p["forward"][0], p["forward"][1] - p["forward"][0])], (y - 0.35, 0.35),
                           color="#1f77b4", label="forward pass (inference loop)")
            ax.broken_barh([(p["coco"][0], p["coco"][1] - p["coco"][0])], (y + 0.0, 0.35),
                           color="#ff7f0e", label=f"COCO evaluation ({p['where']})")
        ax.set_yticks(range(len(r["points"])))
        ax.set_yticklabels([f"s={p['sparsity']:g}" for p in reversed(r["points"])])
        ax.set_title(f"{mode}: sweep {r['wall_s']:.1f} s, forward passes {r['forward_sum_s']:.1f} s "
                     f"({r['wall_s'] / r['forward_sum_s']:.2f}x)", fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        ax.legend(seen.values(), seen.keys(), fontsize=8, loc="upper right")
    axes[-1].set_xlabel("seconds since the sweep's start")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="yolov5n")
    ap.add_argument("--data", default="coco-val128")
    ap.add_argument("--points", default="0,0.3,0.5,0.7")
    ap.add_argument("--figure", type=Path, help="write the timelines here (PNG)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--redraw", type=Path, help="only draw --figure from a --json written before")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.redraw:
        draw(json.loads(args.redraw.read_text()), args.figure)
        return 0
    register_configs()
    setup_process()
    out = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    run_mode("serial", argparse.Namespace(**vars(args) | {"points": args.points.split(",")[0]}), out / "warm-up")
    results = {mode: run_mode(mode, args, out) for mode in MODES}
    for mode, r in results.items():
        print(f"\n{mode}: sweep {r['wall_s']:.2f} s, sum of forward passes {r['forward_sum_s']:.2f} s, "
              f"ratio {r['wall_s'] / r['forward_sum_s']:.2f}")
        print(f"{'point':>6} {'forward':>8} {'coco':>6} {'where':>11} {'coco wait':>10} {'accounting':>11} "
              f"{'data wait':>10} {'mAP50-95':>9}")
        for p in r["points"]:
            print(f"{p['sparsity']:>6g} {p['forward_s']:>8.2f} {p['coco_s']:>6.2f} {p['where']:>11} "
                  f"{p['coco_wait_s']:>10.3f} {p['accounting_s']:>11.3f} {p['data_wait_s']:>10.3f} "
                  f"{p['mAP50-95']:>9.4f}")
    same = [p["mAP50-95"] for p in results["serial"]["points"]] == [p["mAP50-95"] for p in results["overlapped"]["points"]]
    print(f"\nsame COCO numbers in both modes: {same}")
    if args.figure:
        draw(results, args.figure)
        print(f"timeline: {args.figure}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
