"""The inference loop: preprocess -> forward -> NMS -> boxes on the original images, timed per stage like val.py.

It knows no dataset format: each batch's detections go to an evaluator's ``process`` (the evaluator
owns class ids, rounding and the metrics, see ``sweep.evaluate.coco``).
Per-image milliseconds follow val.py: ``ms_preprocess`` (host->device copy, dtype, /255),
``ms_inference`` (forward pass), ``ms_nms`` (non-maximum suppression and box scaling, until the
detections are on the host), each summed over the dataset and divided by the number of images seen.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch

from sweep.evaluate.ops import Detections, postprocess_batch
from sweep.evaluate.reader import read_ahead
from sweep.evaluate.timing import StageClock

log = logging.getLogger(__name__)


class BatchLike(Protocol):
    images: torch.Tensor            # uint8 [B, 3, H, W] RGB, letterboxed to the batch shape
    image_ids: Sequence[Any]
    shapes0: Sequence[tuple[int, int]]                                 # (h0, w0) per image
    ratio_pad: Sequence[tuple[tuple[float, float], tuple[float, float]]]  # ((gh, gw), (padw, padh))


class Evaluator(Protocol):
    def process(self, batch: BatchLike, detections: Detections) -> None:
        """``detections``: the batch's detections as host columns (``image_index`` into ``batch.image_ids``,
        xyxy ``boxes`` in the original image's pixels, ``scores``, ``classes``), image by image, each sorted
        by score (see :class:`sweep.evaluate.ops.Detections`)."""


@dataclass
class LoopResult:
    images: int = 0
    detections: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"preprocess": 0.0, "inference": 0.0, "nms": 0.0,
                                                               "postprocess": 0.0, "data_wait": 0.0})
    shape: tuple[int, ...] = ()

    def per_image_ms(self) -> dict[str, float]:
        n = max(self.images, 1)
        return {f"ms_{k}": self.seconds[k] / n * 1e3 for k in ("preprocess", "inference", "nms")}


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (restored after, also on error).

    For the inference loop + COCO evaluation of one point: they build tens of thousands of
    result dicts, and each full pass of the collector walks every object of the process
    (torch, MLflow, SQLAlchemy, Hydra, ...), a cost per point in the postprocess and COCO stages
    (docs/benchmarks.md). Neither makes reference cycles; drop the rows inside the block and the
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
def _in_inference_mode(f: Any, x: torch.Tensor) -> torch.Tensor:
    return f(x)


@torch.inference_mode()
def run_inference(model: torch.nn.Module, batches: Iterable[BatchLike], evaluator: Evaluator, *,
                  device: torch.device, half: bool, conf: float, iou: float, max_det: int,
                  progress: Any = None, read_ahead_batches: int = 2) -> LoopResult:
    """Run the model over ``batches`` and hand each batch's detections to ``evaluator.process``.

    ``progress`` is an optional tqdm-like object with ``update(n)``.
    Batches are read ``read_ahead_batches`` ahead by a background thread (pinned on CUDA; 0: read in this
    thread); the time this loop waits for them is ``seconds["data_wait"]``, outside every val.py stage.
    The images of a batch go through NMS in parallel threads on the CPU (same results).
    ``ms_nms`` covers NMS and the box scaling on the device until the detections are on the host;
    ``postprocess`` is the evaluator's ``process``. On CUDA the device stages are timed with CUDA events
    (no synchronisation per stage), the host stages with the wall clock.
    """
    res = LoopResult()
    non_blocking = device.type == "cuda"
    threads = nms_threads(device)
    clock = StageClock(device)
    source = read_ahead(batches, read_ahead_batches, pin=non_blocking) if read_ahead_batches else iter(batches)
    waited = 0.0
    with ThreadPoolExecutor(threads, thread_name_prefix="nms") as pool:
        def map_images(f: Any, xs: Sequence[torch.Tensor]) -> Iterable[torch.Tensor]:
            return pool.map(lambda x: _in_inference_mode(f, x), xs) if threads > 1 else map(f, xs)

        try:
            while True:
                w0 = time.perf_counter()
                batch = next(source, None)
                waited += time.perf_counter() - w0
                if batch is None:
                    break
                m0 = clock.mark()
                im = batch.images.to(device, non_blocking=non_blocking)  # pinned by the reader on CUDA
                im = im.half() if half else im.float()
                im /= 255
                m1 = clock.mark()
                pred = model(im)[0]
                m2 = clock.mark()
                dets = postprocess_batch(pred, conf, iou, max_det, batch.ratio_pad, batch.shapes0,
                                         map_images=map_images)  # ends with the copy to the host
                m3 = clock.mark()
                for name, a, b in (("preprocess", m0, m1), ("inference", m1, m2), ("nms", m2, m3)):
                    clock.add(name, a, b)
                t3 = time.perf_counter()
                res.detections += len(dets)
                evaluator.process(batch, dets)
                res.seconds["postprocess"] += time.perf_counter() - t3
                n = len(batch.image_ids)
                res.images += n
                res.shape = tuple(im.shape)
                if progress is not None:
                    progress.update(n)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # stops the reader thread when the loop ends early
    res.seconds |= clock.totals()
    res.seconds["data_wait"] = waited
    return res
