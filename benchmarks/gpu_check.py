"""One-shot GPU check (issues #15, #18): accuracy on CUDA FP16/FP32 vs CPU FP32, the stage split of
yolov5n/s/m/l/x at batch 32 FP16 on a COCO-sized image set, a 10-point sparsity sweep, GPU
utilisation during the forward passes, the replay pipeline (benchmarks/pipeline.py: everything but the
model, in images/s); one JSON + Markdown summary.

On a bare GPU machine (PyTorch, OpenCV, pandas, matplotlib; no internet), from the repo root:

    python benchmarks/gpu_check.py --prepare        # HERE, with internet: wheels + asset copies -> benchmarks/.gpu_check/
    python benchmarks/gpu_check.py --out OUT        # THERE: installs the wheels offline (into .gpu_check/site), runs

``--prepare`` fills the git-ignored ``benchmarks/.gpu_check/`` (wheels of the packages the check
needs beyond the machine's own, for CPython 3.10-3.13, plus copies of yolov5n.pt and coco-val128;
under 64 MiB). ``--dry-run`` runs every part at tiny sizes on the CPU (tested in the suite) and
fills every field the GPU run fills.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUNDLE = HERE / ".gpu_check"
# beyond torch, torchvision, numpy, opencv, pandas, matplotlib (pillow): what sweep's evaluation imports
PURE = ["hydra-core==1.3.2", "omegaconf==2.3.0", "antlr4-python3-runtime==4.9.3", "tqdm", "torch-pruning"]
BINARY = ["pyyaml", "faster-coco-eval", "zstandard", "safetensors"]
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
MODELS = ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5x")

# Sizes of the real run and the dry run.
FULL = dict(models=MODELS, images=5000, batch=32, imgsz=640, acc_limit=None, sweep_points=10, sweep_model="yolov5n",
            sweep_method="l1_unstructured", sweep_limit=None, replay_images=5000, replay_limit=None)
DRY = dict(models=("yolov5n",), images=8, batch=4, imgsz=128, acc_limit=4, sweep_points=3, sweep_model="yolov5n",
           sweep_method="l1_unstructured", sweep_limit=4, replay_images=16, replay_limit=8)

# Every field the summary has (the dry run fills them all; tests check it).
SUMMARY_FIELDS = ("dry_run", "env", "accuracy", "stage_split", "sparsity_sweep", "gpu_utilization", "replay_pipeline",
                  "seconds_total")
REPLAY_FIELDS = ("device", "half", "images", "images_per_s", "images_per_s_overlapped", "seconds", "peak_rss_mb")
ACCURACY_RUNS = ("cpu_fp32", "cuda_fp32", "cuda_fp16")
ACCURACY_FIELDS = ("device", "half", "images", "mAP50-95", "mAP50", "AR100", "ms_inference", "seconds")
STAGES = ("decode", "h2d", "forward", "nms", "coco")
STAGE_FIELDS = ("model", "images", "batch", "imgsz", "half", "device", "params", "seconds", "ms_per_image",
                "images_per_second", "gpu_utilization")
SWEEP_FIELDS = ("sparsity", "sparsity_measured", "mAP50-95", "mAP50", "seconds_prune", "seconds_eval", "seconds")
UTIL_FIELDS = ("mean", "max", "samples", "source")


# ------------------------------------------------------------------------------- preparing and installing


def prepare(bundle: Path = BUNDLE, cache: Path | None = None) -> Path:
    """Download the wheels (pip, a package registry) and copy the test assets into ``bundle``."""
    cache = Path(cache or os.environ.get("SWEEP_CACHE") or REPO.parent / "shared" / "assets")
    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    (bundle / ".gitignore").write_text("*\n")  # the bundle is never committed
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels)]
    subprocess.run(pip + PURE, check=True)
    for py in PYTHONS:
        subprocess.run(pip + ["--only-binary=:all:", "--python-version", py, "--platform", "manylinux2014_x86_64",
                              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
                              *BINARY], check=True)
    assets = bundle / "assets"
    (assets / "weights").mkdir(parents=True, exist_ok=True)
    shutil.copy2(cache / "weights" / "yolov5n.pt", assets / "weights" / "yolov5n.pt")
    if not (assets / "datasets" / "coco-val128").exists():
        shutil.copytree(cache / "datasets" / "coco-val128", assets / "datasets" / "coco-val128")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle {bundle}: {size / 2**20:.1f} MiB (limit 64 MiB)")
    return bundle


def ensure_imports(bundle: Path = BUNDLE) -> None:
    """Make ``sweep`` importable: the repo on sys.path; missing packages installed offline from the bundle."""
    sys.path.insert(0, str(REPO))
    try:
        import faster_coco_eval  # noqa: F401
        import hydra  # noqa: F401
        import safetensors  # noqa: F401
        import torch_pruning  # noqa: F401
        import yaml  # noqa: F401
        import zstandard  # noqa: F401
        return
    except ImportError:
        pass
    site = bundle / "site"
    if not site.exists():
        wheels = bundle / "wheels"
        if not wheels.is_dir():
            raise SystemExit(f"missing packages and no wheels in {wheels}: run --prepare where there is internet")
        names = [p.split("==")[0] for p in PURE + BINARY]
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                        "--find-links",
                        str(wheels), "--target", str(site), *names], check=True)
    sys.path.insert(0, str(site))


# ------------------------------------------------------------------------------- GPU utilisation


class UtilSampler:
    """Samples GPU utilisation (%) every ``period`` s in a thread: torch.cuda.utilization (NVML), else
    nvidia-smi; on a machine without either, no samples and ``source`` says so."""

    def __init__(self, device, period: float = 0.1) -> None:
        self.device, self.period, self.samples = device, period, []
        self.source = self._source()
        self._stop = threading.Event()
        self._thread = None

    def _source(self) -> str:
        import torch

        if self.device.type != "cuda":
            return "unavailable (not a CUDA device)"
        try:
            torch.cuda.utilization(self.device)
            return "nvml"
        except Exception:  # noqa: BLE001 - pynvml missing
            return "nvidia-smi" if shutil.which("nvidia-smi") else "unavailable (no NVML, no nvidia-smi)"

    def _read(self) -> float | None:
        import torch

        if self.source == "nvml":
            return float(torch.cuda.utilization(self.device))
        if self.source == "nvidia-smi":
            idx = self.device.index or 0
            out = subprocess.run(["nvidia-smi", f"--id={idx}", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        return None

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                v = self._read()
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                v = None
            if v is not None:
                self.samples.append(v)

    def __enter__(self) -> "UtilSampler":
        if not self.source.startswith("unavailable"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        s = self.samples
        return {"mean": sum(s) / len(s) if s else None, "max": max(s) if s else None, "samples": len(s),
                "source": self.source}


# ------------------------------------------------------------------------------- building blocks


def _eval_spec(imgsz: int, batch: int, device, half: bool):
    from sweep.config.spec import EvalSpec

    return EvalSpec(imgsz=imgsz, batch=batch, device=str(device), half=half, workers=os.cpu_count() or 2,
                    progress=False, preprocessed=None)


def _data_spec(root: Path, limit: int | None, name: str = "coco-val128"):
    from sweep.config.spec import DataSpec

    return DataSpec(name=name, root=root, val=str(root / "images" / "val2017"), limit=limit)


class _Timed:
    """Wraps the batch iterable: the time spent producing each batch is the decode stage."""

    def __init__(self, batches) -> None:
        self.batches, self.seconds = batches, 0.0

    def __iter__(self):
        it = iter(self.batches)
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - t0
            yield b


def evaluate(model, data_root: Path, *, device, half: bool, imgsz: int, batch: int, limit: int | None,
             util: UtilSampler | None = None, weights: Path | None = None) -> dict:
    """Evaluate ``model`` on the dataset at ``data_root`` with the project's building blocks; stage seconds."""
    import torch

    from sweep.evaluate import CocoEvaluator, run_inference
    from sweep.memo import ProcessMemo

    memo = ProcessMemo()
    ev = _eval_spec(imgsz, batch, device, half)
    data = memo.eval_data(_data_spec(data_root, limit, data_root.name), ev, int(model.stride.max()),
                          list(model.names), weights or data_root)
    model = model.to(device).eval()
    model = model.half() if half else model.float()
    evaluator = CocoEvaluator(data.ground_truth, backend=ev.backend, image_ids=data.image_ids,
                              class_map=data.class_map)
    batches = _Timed(data.dataset.iter_batches() if hasattr(data.dataset, "iter_batches")
                     else memo.batches(data, None))
    t0 = time.perf_counter()
    with util if util is not None else _null():
        loop = run_inference(model, batches, evaluator, device=device, half=half, conf=ev.conf, iou=ev.iou,
                             max_det=ev.max_det)
    t1 = time.perf_counter()
    coco = evaluator.evaluate()
    t2 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = {"decode": batches.seconds, "h2d": loop.seconds["preprocess"], "forward": loop.seconds["inference"],
               "nms": loop.seconds["nms"], "coco": loop.seconds["postprocess"] + (t2 - t1)}
    return {"images": loop.images, "stats": dict(coco.stats), "seconds": seconds, "wall": t2 - t0,
            "ms_inference": loop.seconds["inference"] / max(loop.images, 1) * 1e3}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def repeated_dataset(src: Path, n: int, dst: Path) -> Path:
    """``n`` images named 000000000001.jpg.. (symlinks cycling over ``src``'s images, labels alike): a
    COCO-sized set from coco-val128 with distinct image ids."""
    imgs = sorted((src / "images" / "val2017").glob("*.jpg"))
    (dst / "images" / "val2017").mkdir(parents=True, exist_ok=True)
    (dst / "labels" / "val2017").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = imgs[k % len(imgs)]
        name = f"{k + 1:012d}"
        os.symlink(img, dst / "images" / "val2017" / f"{name}.jpg")
        label = src / "labels" / "val2017" / f"{img.stem}.txt"
        if label.is_file():
            os.symlink(label, dst / "labels" / "val2017" / f"{name}.txt")
    return dst


def random_model(name: str):
    """``name``'s architecture from the bundled yaml with random weights (speed only), names for 80 classes."""
    from sweep.model import build_model, load_model_yaml

    model = build_model(load_model_yaml(name))
    model.names = [str(i) for i in range(int(model.yaml["nc"]))]
    return model.eval()


# ------------------------------------------------------------------------------- the check


def run(out: Path, dry_run: bool, cache: Path) -> dict:
    import torch

    from sweep.config.spec import PruneSpec
    from sweep.model import fuse, load_checkpoint
    from sweep.prune import PRUNERS, select_convs

    sizes = DRY if dry_run else FULL
    t_start = time.perf_counter()
    gpu = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if not dry_run and gpu.type != "cuda":
        raise SystemExit("no CUDA device: run with --dry-run on a CPU machine")
    cpu = torch.device("cpu")
    weights = cache / "weights" / "yolov5n.pt"
    val = cache / "datasets" / "coco-val128"
    dense = fuse(load_checkpoint(weights).model)
    summary: dict = {"dry_run": dry_run}
    summary["env"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(gpu) if gpu.type == "cuda"
                      else platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                      "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()}}

    # 1. accuracy: CPU FP32 vs CUDA FP32 / FP16 (dry run: the "cuda" runs on the CPU in FP32)
    acc = {}
    for key, device, half in (("cpu_fp32", cpu, False), ("cuda_fp32", gpu, False),
                              ("cuda_fp16", gpu, gpu.type == "cuda")):
        t0 = time.perf_counter()
        r = evaluate(copy.deepcopy(dense), val, device=device, half=half, imgsz=sizes["imgsz"], batch=sizes["batch"],
                     limit=sizes["acc_limit"], weights=weights)
        acc[key] = {"device": str(device), "half": half, "images": r["images"], "mAP50-95": r["stats"]["mAP50-95"],
                    "mAP50": r["stats"]["mAP50"], "AR100": r["stats"]["AR100"], "ms_inference": r["ms_inference"],
                    "seconds": time.perf_counter() - t0}
        print(f"accuracy {key}: mAP50-95 {acc[key]['mAP50-95']:.4f}", flush=True)
    acc["delta_vs_cpu"] = {k: {m: acc[k][m] - acc["cpu_fp32"][m] for m in ("mAP50-95", "mAP50", "AR100")}
                           for k in ("cuda_fp32", "cuda_fp16")}
    summary["accuracy"] = acc

    # 2. stage split at batch 32 FP16 on a COCO-sized set, random weights, GPU utilisation during forwards
    splits, all_util = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        big = repeated_dataset(val, sizes["images"], Path(tmp) / "coco-repeated")
        for name in sizes["models"]:
            model = fuse(random_model(name))
            util = UtilSampler(gpu)
            r = evaluate(model, big, device=gpu, half=gpu.type == "cuda", imgsz=sizes["imgsz"], batch=sizes["batch"],
                         limit=None, util=util)
            n = max(r["images"], 1)
            all_util += util.samples
            splits.append({"model": name, "images": r["images"], "batch": sizes["batch"], "imgsz": sizes["imgsz"],
                           "half": gpu.type == "cuda", "device": str(gpu),
                           "params": sum(p.numel() for p in model.parameters()),
                           "seconds": r["seconds"], "ms_per_image": {k: v / n * 1e3 for k, v in r["seconds"].items()},
                           "images_per_second": n / max(r["wall"], 1e-9), "gpu_utilization": util.summary()})
            print(f"stage split {name}: " + ", ".join(f"{k} {v / n * 1e3:.2f}" for k, v in r["seconds"].items())
                  + " ms/img", flush=True)
            del model
            if gpu.type == "cuda":
                torch.cuda.empty_cache()
    summary["stage_split"] = splits

    # 3. a sparsity sweep of one model (prune -> evaluate per point, timed)
    points = []
    method = sizes["sweep_method"]
    for k in range(sizes["sweep_points"]):
        s = round(k / 10, 2)
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        if s > 0:
            model = PRUNERS[method](model, s, PruneSpec(method))
        t1 = time.perf_counter()
        convs = list(select_convs(model, (), ()).values())
        measured = sum(int((c.weight == 0).sum()) for c in convs) / sum(c.weight.numel() for c in convs)
        r = evaluate(model, val, device=gpu, half=gpu.type == "cuda", imgsz=sizes["imgsz"], batch=sizes["batch"],
                     limit=sizes["sweep_limit"], weights=weights)
        t2 = time.perf_counter()
        points.append({"sparsity": s, "sparsity_measured": measured, "mAP50-95": r["stats"]["mAP50-95"],
                       "mAP50": r["stats"]["mAP50"], "seconds_prune": t1 - t0, "seconds_eval": t2 - t1,
                       "seconds": t2 - t0})
        print(f"sweep {method} {s:.1f}: mAP50-95 {points[-1]['mAP50-95']:.4f} in {t2 - t0:.1f}s", flush=True)
    summary["sparsity_sweep"] = {"model": sizes["sweep_model"], "method": method, "points": points,
                                 "seconds_total": sum(p["seconds"] for p in points)}
    summary["gpu_utilization"] = {"mean": sum(all_util) / len(all_util) if all_util else None,
                                  "max": max(all_util) if all_util else None, "samples": len(all_util),
                                  "source": splits[0]["gpu_utilization"]["source"] if splits else "none"}

    # 4. the replay pipeline: everything but the model over a COCO-sized set (batch 32 at 640 in the real run)
    sys.path.insert(0, str(HERE))
    import pipeline

    os.environ.setdefault("SWEEP_CACHE", str(cache))
    with tempfile.TemporaryDirectory(prefix="gpu-check-replay-") as tmp:
        m = pipeline.benchmark(sizes["replay_images"], device=str(gpu), limit=sizes["replay_limit"],
                               batch=sizes["batch"], recordings=Path(tmp))
    summary["replay_pipeline"] = {k: m[k] for k in REPLAY_FIELDS}
    print(f"replay pipeline: {m['images_per_s']:.0f} images/s ({m['images_per_s_overlapped']:.0f} with the COCO "
          "evaluation overlapped)", flush=True)
    summary["seconds_total"] = time.perf_counter() - t_start
    write_summary(summary, out)
    return summary


def write_summary(summary: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js = out / "gpu_check.json"
    js.write_text(json.dumps(summary, indent=2))
    acc = summary["accuracy"]
    lines = [f"# GPU check{' (dry run, CPU)' if summary['dry_run'] else ''}", "",
             f"- device: {summary['env']['device']}, torch {summary['env']['torch']}, CUDA {summary['env']['cuda']}",
             f"- total: {summary['seconds_total']:.0f} s", "", "## Accuracy (yolov5n, coco-val128)", "",
             "| run | device | half | mAP50-95 | mAP50 | AR100 | Δ mAP50-95 vs CPU | ms/img forward |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k in ACCURACY_RUNS:
        a = acc[k]
        d = acc["delta_vs_cpu"].get(k, {}).get("mAP50-95", 0.0)
        lines.append(f"| {k} | {a['device']} | {a['half']} | {a['mAP50-95']:.4f} | {a['mAP50']:.4f} | "
                     f"{a['AR100']:.4f} | {d:+.4f} | {a['ms_inference']:.2f} |")
    lines += ["", "## Stage split (ms / image)", "",
              "| model | images | batch | " + " | ".join(STAGES) + " | img/s | GPU util mean / max % |",
              "| --- | --- | --- | " + " | ".join("---" for _ in STAGES) + " | --- | --- |"]
    for s in summary["stage_split"]:
        u = s["gpu_utilization"]
        util = f"{u['mean']:.0f} / {u['max']:.0f}" if u["mean"] is not None else u["source"]
        lines.append(f"| {s['model']} | {s['images']} | {s['batch']} | "
                     + " | ".join(f"{s['ms_per_image'][k]:.2f}" for k in STAGES)
                     + f" | {s['images_per_second']:.0f} | {util} |")
    sw = summary["sparsity_sweep"]
    lines += ["", f"## Sparsity sweep ({sw['model']}, {sw['method']}, {sw['seconds_total']:.1f} s)", "",
              "| sparsity | measured | mAP50-95 | prune s | eval s |", "| --- | --- | --- | --- | --- |"]
    for p in sw["points"]:
        lines.append(f"| {p['sparsity']:.1f} | {p['sparsity_measured']:.3f} | {p['mAP50-95']:.4f} | "
                     f"{p['seconds_prune']:.2f} | {p['seconds_eval']:.2f} |")
    rp = summary["replay_pipeline"]
    lines += ["", f"## Replay pipeline (everything but the model, {rp['images']} images, {rp['device']})", "",
              f"- {rp['images_per_s']:.0f} images/s; {rp['images_per_s_overlapped']:.0f} images/s with the COCO "
              f"evaluation overlapped by the next point; peak RSS {rp['peak_rss_mb']:.0f} MB",
              "- seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in rp["seconds"].items())]
    md = out / "gpu_check.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("outputs") / "gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (every field filled)")
    ap.add_argument("--prepare", action="store_true", help="download wheels and copy assets into the bundle")
    ap.add_argument("--cache", type=Path, default=None,
                    help="assets (weights/, datasets/): default the bundle's copies, else $SWEEP_CACHE")
    args = ap.parse_args(argv)
    if args.prepare:
        prepare(BUNDLE, args.cache)
        return 0
    ensure_imports(BUNDLE)
    cache = args.cache or (BUNDLE / "assets" if (BUNDLE / "assets").is_dir() else
                           Path(os.environ.get("SWEEP_CACHE", REPO.parent / "shared" / "assets")))
    summary = run(args.out, args.dry_run, Path(cache).resolve())
    print(f"summary: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.md'} ({summary['seconds_total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
