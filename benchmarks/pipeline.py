"""Replay benchmark (issue #18): the ceiling of everything in an evaluation point that is not the model.

The tool's own evaluation pipeline (batch source -> preprocess -> forward -> NMS -> postprocess/evaluator ->
COCO evaluation) over a COCO-sized image set, coco-val128 repeated to ``--images``, with the forward pass
replaced by replaying yolov5n's recorded raw outputs (``[B, N, 85]`` per batch, already on the device). The
images/s it reaches is what the tool could do with an infinitely fast model.

    SWEEP_CACHE=../shared/assets .venv/bin/python benchmarks/pipeline.py --images 5000
    SWEEP_CACHE=../shared/assets .venv/bin/python benchmarks/pipeline.py --images 5000 --device cuda  # FP16
    ... --backend pycocotools|faster  --source cache|memory  --json out.json

The recording (the dense fused yolov5n run once over coco-val128's batches on the benchmark's device, FP32 on
the CPU, FP16 on CUDA) is cached in the git-ignored ``benchmarks/.pipeline/``. The batches are read from a
preprocessed cache in a temporary folder, built before the timed run (``--source cache``: what a job streams
for a set larger than ``eval.cache_gb``, e.g. COCO val2017 at 640) or from memory
(``--source memory``: the memo's path for a set that fits).

Everything that touches the APIs other branches are changing (``run_inference``, ``CocoEvaluator``, the batch
source) is in the section "coupling to the tool's evaluation API" below. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import hashlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from sweep.data import Batch, PreprocessedCache  # noqa: E402
from sweep.evaluate import CocoEvaluator, gc_paused, run_inference  # noqa: E402
from sweep.memo import EvalData, ProcessMemo  # noqa: E402

RECORDINGS = HERE / ".pipeline"
ID_STRIDE = 10**7  # image id of repetition r = original id + r * ID_STRIDE (COCO ids are < 10^7)


# ------------------------------------------------------------------------------- coupling to the tool's evaluation API
# The only place that calls run_inference, CocoEvaluator and the batch source: adapt these two functions when
# those APIs change (batched post-processing, a background batch reader, COCO evaluation in a worker process).
# ``read`` is timed in big_batches, in the background reader thread that pulls the batches (it overlaps the
# loop); the loop's own wait for a batch is ``data_wait``, from run_inference.


def source_pass(memo: ProcessMemo, data: EvalData, preprocessed: Path, source: str) -> Iterable[Batch]:
    """One pass over the small set's decoded batches, in order, as a job reads them."""
    if source == "cache":  # what memo.batches streams every pass for a set beyond eval.cache_gb
        return PreprocessedCache(preprocessed).batches(data.dataset)
    return memo.batches(data, preprocessed)  # in memory after the first full pass


def evaluate_pipeline(model: nn.Module, batches: Iterable[Batch], ground_truth: dict, image_ids: list,
                      class_map: list[int], ev: Any, device: torch.device, backend: str) -> dict[str, Any]:
    """The job's inference loop and COCO evaluation (as ``sweep.job.measure`` runs them). Returns the 12 COCO
    numbers, images, detections and seconds per stage (without ``data``, timed by the caller)."""
    evaluator = CocoEvaluator(ground_truth, backend=backend, image_ids=image_ids, class_map=class_map)
    with gc_paused():
        loop = run_inference(model, batches, evaluator, device=device, half=ev.half, conf=ev.conf, iou=ev.iou,
                             max_det=ev.max_det)
        t0 = time.perf_counter()
        coco = evaluator.evaluate()
        coco_s = time.perf_counter() - t0
        del evaluator
    s = loop.seconds
    return {"stats": dict(coco.stats), "images": loop.images, "detections": loop.detections,
            "seconds": {"data_wait": s["data_wait"], "preprocess": s["preprocess"], "forward": s["inference"],
                        "nms": s["nms"], "postprocess": s["postprocess"], "coco_eval": coco_s}}


# ------------------------------------------------------------------------------- the setup a job makes


@dataclasses.dataclass
class Setup:
    spec: Any                 # the resolved JobSpec
    memo: ProcessMemo
    data: EvalData
    model: nn.Module          # dense, fused, on the device, FP16 when spec.eval.half
    device: torch.device
    preprocessed: Path        # the temporary preprocessed cache folder
    source: str               # cache | memory


def setup(work: Path, *, device: str = "cpu", batch: int = 32, limit: int | None = None,
          source: str = "cache") -> Setup:
    """Resolve a dense yolov5n job on coco-val128 as the tool does (the real config, ``resolve_job``), load its
    model as ``measure`` does, and fill the preprocessed cache under ``work`` (outside the timed run)."""
    from hydra import compose, initialize_config_dir

    from sweep.config import register_configs
    from sweep.config.resolve import resolve_job
    from sweep.model import fuse

    register_configs()
    overrides = ["model=yolov5n", "data=coco-val128", "sparsity=0", "recover=none", f"eval.device={device}",
                 f"eval.batch={batch}", "eval.progress=false", "eval.latency=false", "mlflow.enabled=false",
                 f"paths.outputs={work}", f"paths.preprocessed={work / 'pre'}"]
    if limit is not None:
        overrides.append(f"data.limit={limit}")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    memo = ProcessMemo()
    spec = resolve_job(cfg, memo)
    ev = spec.eval
    ckpt = memo.checkpoint(spec.model.weights, spec.model.sha256)
    data = memo.eval_data(spec.data, ev, int(ckpt.stride.max()), ckpt.names, spec.model.weights)
    model = fuse(copy.deepcopy(ckpt.model).float().eval())  # the dense job's model (sweep.job.prune_and_recover)
    dev = torch.device(ev.device)
    model = model.to(dev).eval()
    model = model.half() if ev.half else model
    for _ in source_pass(memo, data, ev.preprocessed, source):  # builds the cache (memory: keeps the batches)
        pass
    return Setup(spec, memo, data, model, dev, ev.preprocessed, source)


# ------------------------------------------------------------------------------- the repeated (COCO-sized) set


@dataclasses.dataclass
class Repeated:
    plan: list[tuple[int, int, int]]  # per big batch: (repetition, small batch k, first n images of it)
    image_ids: list[Any]
    ground_truth: dict[str, Any]


def repeat_id(image_id: Any, rep: int) -> Any:
    if rep == 0:
        return image_id
    return image_id + rep * ID_STRIDE if isinstance(image_id, int) else f"{image_id}#{rep}"


def repeated_set(data: EvalData, images: int) -> Repeated:
    """``images`` images: the small set's batches cycled (big batch j = small batch j mod K, the last one cut
    short), ids made distinct per repetition, the ground truth's images and annotations duplicated to match."""
    ds = data.dataset
    plan, ids, left, j = [], [], images, 0
    while left > 0:
        rep, k = divmod(j, ds.num_batches)
        small = [ds.image_ids[i] for i in ds.batch_indices(k)]
        n = min(len(small), left)
        plan.append((rep, k, n))
        ids += [repeat_id(i, rep) for i in small[:n]]
        left -= n
        j += 1
    gt = data.ground_truth
    by_id = {im["id"]: im for im in gt["images"]}
    anns = collections.defaultdict(list)
    for a in gt["annotations"]:
        anns[a["image_id"]].append(a)
    gt_images, gt_anns = [], []
    for r, k, n in plan:
        for orig in [ds.image_ids[x] for x in ds.batch_indices(k)][:n]:
            new = repeat_id(orig, r)
            gt_images.append(by_id[orig] | {"id": new})
            for a in anns[orig]:
                gt_anns.append(a | {"id": len(gt_anns) + 1, "image_id": new})  # ids from 1, as COCO wants
    big = {k: v for k, v in gt.items() if k not in ("images", "annotations")}
    return Repeated(plan, ids, big | {"images": gt_images, "annotations": gt_anns})


def big_batches(s: Setup, rep_set: Repeated, feed: Any, seconds: dict[str, float]) -> Iterator[Batch]:
    """The repeated set's batches from passes over the small set's source; the time spent reading each batch
    goes to ``seconds['read']`` (in the reader thread); ``feed(k, n)`` tells a replaying model which batch
    comes next."""
    it: Iterator[Batch] | None = None
    try:
        for rep, k, n in rep_set.plan:
            t0 = time.perf_counter()
            if k == 0:
                if it is not None:
                    _close(it)
                it = iter(source_pass(s.memo, s.data, s.preprocessed, s.source))
            b = next(it)
            if b.index != k:
                raise RuntimeError(f"the batch source gave batch {b.index}, expected {k}")
            ids = [repeat_id(i, rep) for i in b.image_ids[:n]]
            out = Batch(b.images[:n], ids, b.paths[:n], b.shapes0[:n], b.ratio_pad[:n], b.index)
            seconds["read"] += time.perf_counter() - t0
            if feed is not None:
                feed(k, n)
            yield out
    finally:
        if it is not None:
            _close(it)


def _close(it: Iterator) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


# ------------------------------------------------------------------------------- recording and replaying


class _Keyed(nn.Module):
    """Told by the batch source which small batch (and how many of its images) each forward call gets: in
    order, so a source that reads ahead still pairs them right."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: collections.deque[tuple[int, int]] = collections.deque()

    def expect(self, k: int, n: int) -> None:
        self.keys.append((k, n))


class Recorder(_Keyed):
    """The real model, keeping each batch's first output (the raw predictions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out: dict[int, tuple[torch.Tensor, tuple[int, ...]]] = {}

    def forward(self, im: torch.Tensor) -> Any:
        k, n = self.keys.popleft()
        out = self.model(im)
        self.out[k] = (out[0].detach().clone(), tuple(im.shape))
        return out


class Replay(_Keyed):
    """Returns ``(recorded raw predictions of this batch, None)``: a forward pass that costs ~0."""

    def __init__(self, recorded: dict[int, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        super().__init__()
        self.recorded = recorded

    def forward(self, im: torch.Tensor) -> tuple[torch.Tensor, None]:
        k, n = self.keys.popleft()
        pred, shape = self.recorded[k]
        if tuple(im.shape[1:]) != shape[1:] or im.shape[0] != n:  # the wrong batch would still "evaluate"
            raise RuntimeError(f"replay of batch {k}: images {tuple(im.shape)}, recorded for {shape} (first {n})")
        return (pred if n == shape[0] else pred[:n]), None


def device_name(device: torch.device) -> str:
    """The GPU's name or the CPU's architecture (sweep.job's fuller name needs MLflow, absent on a GPU box)."""
    import platform

    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()


def recording_key(s: Setup) -> str:
    ev = s.spec.eval
    parts = [s.spec.model.sha256, s.data.dataset.cache_key(), ev.imgsz, ev.batch, ev.half, str(s.device.type),
             device_name(s.device), torch.__version__]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def recorded_outputs(s: Setup, batches: int, folder: Path = RECORDINGS) -> tuple[dict, str]:
    """The raw predictions of the small set's first ``batches`` batches on the setup's device: from
    ``folder`` when recorded before, else recorded through the pipeline itself (so the model sees exactly
    what the timed run feeds it) and saved. Returns (k -> (pred on the device, image shape), where)."""
    entry = folder / recording_key(s)
    files = [entry / f"batch_{k:05d}.pt" for k in range(batches)]
    where = "cached"
    if not all(f.is_file() for f in files):
        where = "recorded"
        rec = Recorder(s.model)
        run(s, rec, repeated_set(s.data, sum(len(s.data.dataset.batch_indices(k)) for k in range(batches))))
        entry.mkdir(parents=True, exist_ok=True)
        for k, (pred, shape) in rec.out.items():
            tmp = entry / f".batch_{k:05d}.pt.tmp"
            torch.save({"pred": pred.cpu(), "shape": list(shape)}, tmp)
            tmp.rename(entry / f"batch_{k:05d}.pt")
    out = {}
    for k, f in enumerate(files):
        d = torch.load(f, map_location=s.device, weights_only=True)
        out[k] = (d["pred"], tuple(d["shape"]))
    return out, where


# ------------------------------------------------------------------------------- the timed run


def run(s: Setup, model: nn.Module, rep_set: Repeated, backend: str | None = None) -> dict[str, Any]:
    """The pipeline over ``rep_set`` with ``model``: COCO numbers, wall seconds, seconds per stage (``read_s``:
    the background reader's seconds, overlapping the loop, not a stage of it)."""
    seconds = {"read": 0.0}
    feed = getattr(model, "expect", None)
    t0 = time.perf_counter()
    r = evaluate_pipeline(model, big_batches(s, rep_set, feed, seconds), rep_set.ground_truth, rep_set.image_ids,
                          s.data.class_map, s.spec.eval, s.device, backend or s.spec.eval.backend)
    wall = time.perf_counter() - t0
    r["read_s"] = seconds["read"]
    r["seconds"]["other"] = wall - sum(r["seconds"].values())
    r["wall_s"] = wall
    return r


def reset_peak_rss() -> bool:
    """Start the peak-RSS count here (Linux: ``clear_refs`` 5), so the setup and the recording are not in it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    return _status_mb("VmRSS") or float("nan")


def benchmark(images: int, *, device: str = "cpu", backend: str | None = None, source: str = "cache",
              batch: int = 32, limit: int | None = None, recordings: Path = RECORDINGS) -> dict[str, Any]:
    from sweep.process import setup_process

    setup_process()  # as the entry point does (host-memory reuse)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        s = setup(Path(tmp), device=device, batch=batch, limit=limit, source=source)
        rep_set = repeated_set(s.data, images)
        recorded, where = recorded_outputs(s, min(len(rep_set.plan), s.data.dataset.num_batches), recordings)
        replay_mb = sum(p.numel() * p.element_size() for p, _ in recorded.values()) / 2**20
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        exact_peak = reset_peak_rss()
        rss_before = current_rss_mb()
        r = run(s, Replay(recorded), rep_set, backend)
        peak = peak_rss_mb()
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        children = children / 1024 if children > children_before else 0.0  # a larger child ended during the run
    ev = s.spec.eval
    return {"images": r["images"], "distinct_image_ids": len(set(rep_set.image_ids)),
            "annotations": len(rep_set.ground_truth["annotations"]), "detections": r["detections"],
            "wall_s": r["wall_s"], "images_per_s": r["images"] / r["wall_s"], "seconds": r["seconds"],
            "read_s": r["read_s"],
            # a sweep evaluates a point's COCO numbers in the worker while the next point runs: its steady state
            "images_per_s_overlapped": r["images"] / max(r["wall_s"] - r["seconds"]["coco_eval"],
                                                         r["seconds"]["coco_eval"]),
            "rss_before_mb": rss_before, "peak_rss_mb": peak, "peak_rss_children_mb": children, "peak_rss_since_setup": exact_peak,
            "replay_tensors_mb": replay_mb, "recording": where, "stats": r["stats"],
            "source": source, "backend": backend or ev.backend, "device": str(s.device),
            "device_name": device_name(s.device), "half": ev.half, "batch": ev.batch, "imgsz": ev.imgsz,
            "small_set_images": len(s.data), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def print_table(m: dict[str, Any]) -> None:
    print(f"{m['images']} images ({m['small_set_images']} x {m['images'] / m['small_set_images']:.1f}, "
          f"{m['distinct_image_ids']} distinct ids, {m['annotations']} boxes), {m['detections']} detections; "
          f"{m['device_name']}, {'FP16' if m['half'] else 'FP32'}, batch {m['batch']}, "
          f"source {m['source']}, backend {m['backend']}, replay {m['recording']}")
    print(f"{'stage':<12} {'s':>8} {'ms/img':>8} {'share':>6}")
    for k, v in m["seconds"].items():
        print(f"{k:<12} {v:>8.2f} {v / m['images'] * 1e3:>8.2f} {v / m['wall_s']:>6.0%}")
    print(f"{'total':<12} {m['wall_s']:>8.2f} {m['wall_s'] / m['images'] * 1e3:>8.2f}  -> "
          f"{m['images_per_s']:.0f} images/s; {m['images_per_s_overlapped']:.0f} images/s with the COCO evaluation "
          f"overlapped by the next point (a sweep's steady state)")
    print(f"background reader: {m['read_s']:.2f} s reading batches, overlapping the loop")
    children = f"child processes {m['peak_rss_children_mb']:.0f} MB; " if m["peak_rss_children_mb"] else ""
    print(f"peak RSS {m['peak_rss_mb']:.0f} MB{'' if m['peak_rss_since_setup'] else ' (whole process)'}, "
          f"{m['rss_before_mb']:.0f} MB before the run "
          f"(of which {m['replay_tensors_mb']:.0f} MB replayed outputs"
          f"{'' if m['device'] == 'cpu' else ', on the GPU'}); {children}"
          f"mAP50-95 {m['stats']['mAP50-95']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000, help="size of the repeated set")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (FP16 on CUDA)")
    ap.add_argument("--backend", choices=("pycocotools", "faster"), help="COCO backend (default: eval.backend's)")
    ap.add_argument("--source", choices=("cache", "memory"), default="cache",
                    help="batches from the preprocessed cache every pass, or kept in memory")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--limit", type=int, help="only the first N images of coco-val128 (tests)")
    ap.add_argument("--recordings", type=Path, default=RECORDINGS, help="where the recorded outputs are cached")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    m = benchmark(args.images, device=args.device, backend=args.backend, source=args.source, batch=args.batch,
                  limit=args.limit, recordings=args.recordings)
    print_table(m)
    if args.json:
        args.json.write_text(json.dumps(m, indent=2))


if __name__ == "__main__":
    sys.exit(main())
