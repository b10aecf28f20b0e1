"""The inference loop: preprocess -> forward -> NMS -> COCO rows, timed per stage like val.py.

It knows nothing about pycocotools: finished rows go to an evaluator's ``update``.
Per-image milliseconds follow val.py: ``ms_preprocess`` (host->device copy, dtype, /255),
``ms_inference`` (forward pass), ``ms_nms`` (non-maximum suppression), each summed over the
dataset and divided by the number of images seen.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch

from sweep.evaluate.ops import coco_rows, nms_image, scale_boxes
from sweep.evaluate.timing import sync

log = logging.getLogger(__name__)


class BatchLike(Protocol):
    images: torch.Tensor            # uint8 [B, 3, H, W] RGB, letterboxed to the batch shape
    image_ids: Sequence[Any]
    shapes0: Sequence[tuple[int, int]]                                 # (h0, w0) per image
    ratio_pad: Sequence[tuple[tuple[float, float], tuple[float, float]]]  # ((gh, gw), (padw, padh))


class Updatable(Protocol):
    def update(self, rows: list[dict[str, Any]]) -> None: ...


@dataclass
class LoopResult:
    images: int = 0
    detections: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"preprocess": 0.0, "inference": 0.0, "nms": 0.0,
                                                               "postprocess": 0.0})
    shape: tuple[int, ...] = ()

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {f"ms_{k}": self.seconds[k] / n * 1e3 for k in ("preprocess", "inference", "nms")}


def gpu_for_job(job_num: int, device_count: int) -> int:
    """The CUDA index a job uses under ``eval.device=auto``: jobs spread round-robin over the visible GPUs.

    With ``hydra/launcher=joblib`` and ``n_jobs`` equal to the number of GPUs, jobs dispatched
    together (``k .. k+n_jobs-1``) land on different GPUs. The job number decides, not which GPU
    is free: jobs of very different length can meet on one GPU while another idles.
    """
    if device_count < 1:
        raise ValueError(f"device_count={device_count} is invalid: need at least one CUDA device")
    if job_num < 0:
        raise ValueError(f"job_num={job_num} is invalid: job numbers start at 0")
    return job_num % device_count


def resolve_device(device: str, half: bool | None, job_num: int = 0) -> tuple[torch.device, bool]:
    """``auto`` -> CUDA when present (``cuda:<job_num % GPUs>``); ``half`` None -> FP16 on CUDA.

    FP16 on CPU is refused with a warning. The index is chosen here, on the torch device;
    CUDA_VISIBLE_DEVICES is never touched (a Slurm job with one GPU sees exactly that one).
    """
    if device == "auto":
        dev = (torch.device("cuda", gpu_for_job(job_num, torch.cuda.device_count()))
               if torch.cuda.is_available() else torch.device("cpu"))
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            from sweep.config.schema import ConfigError
            raise ConfigError(f"eval.device={device!r} is invalid: no CUDA device is available here; "
                              "allowed are auto or cpu")
    if half is None:
        half = dev.type == "cuda"
    if half and dev.type != "cuda":
        log.warning("eval.half=true is only supported on CUDA; evaluating in FP32 on %s", dev)
        half = False
    return dev, bool(half)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (restored after, also on error).

    For the inference loop + COCO evaluation of one point: they build tens of thousands of
    result dicts, and each full pass of the collector walks every object of the process
    (torch, MLflow, SQLAlchemy, Hydra, ...): measured 0.25-0.3 s per point in the postprocess
    and COCO stages. Neither makes reference cycles; drop the rows inside the block and the
    collector never sees them.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def nms_threads(device: torch.device) -> int:
    """Threads for per-image NMS: torch's intra-op threads on the CPU (torchvision's CPU kernel
    is single-threaded and releases the GIL); 1 on CUDA, where the kernels queue on one stream."""
    return max(1, torch.get_num_threads()) if device.type == "cpu" else 1


@torch.inference_mode()  # thread-local: pool threads enter it themselves, like the loop's thread
def _nms_in_thread(x: torch.Tensor, conf: float, iou: float, max_det: int) -> torch.Tensor:
    return nms_image(x, conf, iou, max_det)


@torch.inference_mode()
def run_inference(model: torch.nn.Module, batches: Iterable[BatchLike], evaluator: Updatable, *,
                  device: torch.device, half: bool, conf: float, iou: float, max_det: int,
                  class_map: Sequence[int] | None = None, progress: Any = None) -> LoopResult:
    """Run the model over ``batches`` and feed COCO result rows to ``evaluator``.

    ``class_map`` maps class index -> COCO category id (identity when None).
    ``progress`` is an optional tqdm-like object with ``update(n)``.
    The images of a batch go through NMS in parallel threads on the CPU (same results).
    """
    res = LoopResult()
    non_blocking = device.type == "cuda"
    threads = nms_threads(device)
    with ThreadPoolExecutor(threads, thread_name_prefix="nms") as pool:
        for batch in batches:
            t0 = time.perf_counter()
            im = batch.images
            if non_blocking:
                im = im.pin_memory()
            im = im.to(device, non_blocking=non_blocking)
            im = im.half() if half else im.float()
            im /= 255
            sync(device)
            t1 = time.perf_counter()
            pred = model(im)[0]
            sync(device)
            t2 = time.perf_counter()
            if threads > 1:
                out = list(pool.map(lambda x: _nms_in_thread(x, conf, iou, max_det), pred))
            else:
                out = [nms_image(x, conf, iou, max_det) for x in pred]
            sync(device)
            t3 = time.perf_counter()
            for dets, image_id, shape0, rp in zip(out, batch.image_ids, batch.shapes0, batch.ratio_pad):
                # on the model's device, in FP32, as val.py does (CUDA division can differ from CPU's in the last bit)
                dets = dets.float()
                scale_boxes(dets[:, :4], rp, shape0)  # in place
                rows = coco_rows(dets, image_id, class_map)
                res.detections += len(rows)
                evaluator.update(rows)
            t4 = time.perf_counter()
            n = len(batch.image_ids)
            res.images += n
            res.shape = tuple(im.shape)
            for k, dt in zip(("preprocess", "inference", "nms", "postprocess"),
                             (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                res.seconds[k] += dt
            if progress is not None:
                progress.update(n)
    return res


@torch.inference_mode()
def measure_latency(model: torch.nn.Module, *, device: torch.device, half: bool, imgsz: int, batch: int,
                    iters: int, warmup: int = 2) -> float:
    """Median milliseconds of one forward pass on a fixed synthetic [batch, 3, imgsz, imgsz] input.

    CUDA is timed with events; the CPU with ``perf_counter``.
    """
    dtype = torch.half if half else torch.float
    x = torch.full((batch, 3, imgsz, imgsz), 0.5, device=device, dtype=dtype)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))
