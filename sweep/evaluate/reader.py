"""Decoded batches read ahead by a background thread, so reading the next batch overlaps the model's work.

The thread pulls from any iterable of batches (the on-disk cache's ``np.load`` + checksum, the decoder, or
the in-memory list) while the loop runs the current batch: file reads, checksums, OpenCV and pinning all
release the GIL. On CUDA each batch's images are copied into page-locked (pinned) memory here, off the
timed stages, so the loop's host-to-device copy is a plain asynchronous one.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Iterable, Iterator, TypeVar

B = TypeVar("B")

_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def read_ahead(batches: Iterable[B], depth: int = 2, pin: bool = False) -> Iterator[B]:
    """Yield ``batches`` in order, read by a background thread at most ``depth`` batches ahead (holding no
    more than that: the memory bound). ``pin``: each batch's ``images`` tensor is replaced, on a shallow copy
    of the batch, by a pinned copy. An error of the source is raised here, at the batch it concerns; a
    consumer that stops early stops the thread."""
    if depth < 1:
        raise ValueError(f"depth={depth} is invalid: read at least one batch ahead")
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if pin:
                    batch = copy.copy(batch)
                    batch.images = batch.images.pin_memory()  # type: ignore[attr-defined]
                if not put(batch):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(exc))

    thread = threading.Thread(target=produce, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()
