"""On-disk cache of decoded + letterboxed batches, shared by every process and later sweeps.

Layout: ``<paths.preprocessed>/<dataset.cache_key()>/`` holding ``batch_<k>.npy`` (uint8
``[B, 3, H, W]``, exactly what the evaluator feeds the model) and ``meta.json`` (per-batch
image ids, paths, original shapes, letterbox ratio/pad, array shape and byte size). The key
covers the file list with sizes and mtimes, imgsz, stride, pad, batch size and the
preprocessing/OpenCV versions, so a stale entry is never found.

Writes are atomic: a private temp folder is filled, then renamed onto the key; a process that
loses the race discards its copy. Reads are validated (every file present with the recorded
shape); a corrupt entry is deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from sweep.data.dataset import Batch

log = logging.getLogger(__name__)

FORMAT = 1


def writable(folder: Path) -> bool:
    """True when ``folder`` (or its nearest existing parent) is writable by its mode bits.

    Mode bits rather than ``os.access``: a read-only asset folder stays untouched even for root.
    """
    p = folder
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    mode = p.stat().st_mode
    return bool(mode & stat.S_IWUSR) and os.access(p, os.W_OK)


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
        """The validated entry as (batch file, batch meta) pairs, or None when absent/invalid.

        Validation reads only the .npy headers (memory-mapped); pixels are read by ``batches``.
        """
        entry = self.entry(dataset)
        meta_file = entry / "meta.json"
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
            if meta.get("format") != FORMAT or len(meta["batches"]) != dataset.num_batches:
                raise ValueError("format or batch count differs")
            files = []
            for k, m in enumerate(meta["batches"]):
                f = entry / f"batch_{k:05d}.npy"
                arr = np.load(f, mmap_mode="r")
                if list(arr.shape) != m["shape"] or arr.dtype != np.uint8:
                    raise ValueError(f"batch {k} has shape {arr.shape}, expected {m['shape']}")
                files.append((f, m))
            return files
        except (OSError, ValueError, KeyError, EOFError) as exc:
            log.warning("preprocessed cache %s is invalid (%s): rebuilding it", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    @staticmethod
    def _read(k: int, f: Path, m: dict[str, Any]) -> Batch:
        return Batch(torch.from_numpy(np.load(f)), m["image_ids"], m["paths"], [tuple(s) for s in m["shapes0"]],
                     [(tuple(r), tuple(p)) for r, p in m["ratio_pad"]], k)

    def build(self, dataset: Any) -> Iterator[Batch]:
        """Decode every batch (yielding it as it comes) and store the entry atomically at the end."""
        entry = self.entry(dataset)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}.", suffix=".tmp", dir=self.root))
        metas = []
        try:
            for k, batch in enumerate(dataset.iter_batches()):
                np.save(tmp / f"batch_{k:05d}.npy", batch.images.numpy(), allow_pickle=False)
                metas.append(_meta(batch))
                yield batch
            (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "batches": metas}))
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
            yield self._read(k, f, m)
