"""On-disk cache of decoded + letterboxed batches, shared by every process and later sweeps.

Layout: ``<paths.preprocessed>/<dataset.cache_key()>/`` holding ``batch_<k>.npy`` (uint8
``[B, 3, H, W]``, exactly what the evaluator feeds the model) and ``meta.json`` (per-batch
image ids, paths, original shapes, letterbox ratio/pad, array shape and byte size). The key
covers the file list with sizes and mtimes, imgsz, stride, pad, batch size and the
preprocessing/OpenCV versions, so a stale entry is never found.

Writes are atomic: a private temp folder is filled, then renamed onto the key; a process that
loses the race discards its copy. Reads are verified, never trusted: ``meta.json`` against its
checksum (``meta.sha256``) and its image ids against the dataset's, every file present with the
recorded shape, and each batch's pixels against their sha256 as the batch is read (its cost:
docs/benchmarks.md). A damaged batch is decoded again from
the images, with a log line, and the entry is rebuilt on the next pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from sweep.assets import writable
from sweep.data.dataset import Batch

log = logging.getLogger(__name__)

FORMAT = 2  # 2: per-batch pixel checksums and a checksum of meta.json


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).data).hexdigest()


def _meta(batch: Batch) -> dict[str, Any]:
    return {"image_ids": list(batch.image_ids), "paths": list(batch.paths),
            "shapes0": [list(s) for s in batch.shapes0],
            "ratio_pad": [[list(r), list(p)] for r, p in batch.ratio_pad], "shape": list(batch.images.shape)}


class PreprocessedCache:
    """``batches(dataset)``: cached batches when a valid entry exists, else decode and store."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, dataset: Any) -> Path:
        return self.root / dataset.cache_key()

    def load(self, dataset: Any) -> list[tuple[Path, dict[str, Any]]] | None:
        """The verified entry as (batch file, batch meta) pairs, or None when absent/invalid.

        Verifies ``meta.json`` (checksum, format, batch count, image ids), and every .npy header
        (memory-mapped); pixels are read, and checked against their checksum, by ``batches``.
        """
        entry = self.entry(dataset)
        meta_file = entry / "meta.json"
        if not meta_file.is_file():
            return None
        try:
            raw = meta_file.read_bytes()
            if (entry / "meta.sha256").read_text().strip() != hashlib.sha256(raw).hexdigest():
                raise ValueError("meta.json does not match its checksum")
            meta = json.loads(raw)
            if meta.get("format") != FORMAT or len(meta["batches"]) != dataset.num_batches:
                raise ValueError("format or batch count differs")
            files = []
            for k, m in enumerate(meta["batches"]):
                if list(m["image_ids"]) != [dataset.image_ids[i] for i in dataset.batch_indices(k)]:
                    raise ValueError(f"batch {k} lists other images than the dataset's")
                f = entry / f"batch_{k:05d}.npy"
                arr = np.load(f, mmap_mode="r")
                if list(arr.shape) != m["shape"] or arr.dtype != np.uint8:
                    raise ValueError(f"batch {k} has shape {arr.shape}, expected {m['shape']}")
                files.append((f, m))
            return files
        except (OSError, ValueError, KeyError, EOFError, TypeError) as exc:
            log.warning("preprocessed cache %s is invalid (%s): rebuilding it", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def _read(self, dataset: Any, k: int, f: Path, m: dict[str, Any]) -> Batch:
        """Batch ``k`` from the entry; decoded again from the images when its pixels fail their checksum."""
        try:
            images = np.load(f)
            intact = _digest(images) == m["sha256"]
        except (OSError, ValueError, EOFError):
            intact = False
        if not intact:
            log.warning("preprocessed cache %s: batch %d is damaged (checksum): decoding it from the images; "
                        "the entry is rebuilt on the next pass", f.parent, k)
            (f.parent / "meta.sha256").unlink(missing_ok=True)  # the next load() finds it invalid
            return dataset.load_batch(k)
        idx = dataset.batch_indices(k)
        return Batch(torch.from_numpy(images), [dataset.image_ids[i] for i in idx], [dataset.files[i] for i in idx],
                     [tuple(s) for s in m["shapes0"]], [(tuple(r), tuple(p)) for r, p in m["ratio_pad"]], k)

    def build(self, dataset: Any) -> Iterator[Batch]:
        """Decode every batch (yielding it as it comes) and store the entry atomically at the end."""
        entry = self.entry(dataset)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}.", suffix=".tmp", dir=self.root))
        metas = []
        try:
            for k, batch in enumerate(dataset.iter_batches()):
                pixels = batch.images.numpy()
                np.save(tmp / f"batch_{k:05d}.npy", pixels, allow_pickle=False)
                metas.append(_meta(batch) | {"sha256": _digest(pixels)})
                yield batch
            raw = json.dumps({"format": FORMAT, "batches": metas}).encode()
            (tmp / "meta.json").write_bytes(raw)
            (tmp / "meta.sha256").write_text(hashlib.sha256(raw).hexdigest())
            with contextlib.suppress(OSError):  # another process stored the same entry first: theirs is as good
                os.rename(tmp, entry)
        finally:  # ours not renamed (theirs won, or an error): remove it
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def batches(self, dataset: Any) -> Iterator[Batch]:
        cached = self.load(dataset)
        if cached is None:
            log.info("preprocessed cache: building %s", self.entry(dataset))
            yield from self.build(dataset)
            return
        for k, (f, m) in enumerate(cached):
            yield self._read(dataset, k, f, m)
