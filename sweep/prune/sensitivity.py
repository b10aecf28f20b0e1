"""Per-layer sparsity from label-free sensitivity curves (``prune=sensitivity``).

Measure (:func:`measure_curves`): for every selected conv alone, its ``round(level * n)``
smallest-magnitude weights are zeroed (torch's per-layer L1 rule) at each of ``prune.levels`` and
the calibration images are run; the layer's distortion at that level is

    D = sum over images and Detect levels of (raw - raw_dense)**2  /  sum of raw_dense**2

where ``raw`` are the Detect head's raw per-level maps (logits before the sigmoid, every anchor,
cell and channel). Raw maps rather than decoded boxes: decoded outputs mix pixel coordinates with
probabilities, so a few large box values would dominate; normalising by the dense output's energy
makes D a relative error comparable across models and image sets. No labels are used. On a
YOLOv5 ``DetectionModel`` each pass reuses the dense outputs of the layers before the pruned one
(only the rest of the network runs again).

Allocate (:func:`allocate`): each layer's curve is the piecewise-linear interpolation of
``(zeros, D)`` through ``(zeros already present, 0)`` and the measured points; the total
``sum_l D_l(z_l)`` is minimised subject to ``sum_l z_l = round(sparsity * N_total)`` over the
lower convex hull of every curve (the Lagrangian solution: hull segments are taken in ascending
order of distortion per zeroed weight, the last one partly). Hull vertices are integer counts and
the partial segment takes the integer remainder, so the per-layer counts are integers that add up
exactly. A curve that is not convex is replaced by its hull (the gain of a bump is not chased).

Curves are measured once per model (checkpoint sha256, fused or not, selected layers) and
calibration set (image files, imgsz, count), levels and device type: kept in the process memo and
on disk (:class:`CurveStore`), see ``sweep.memo.ProcessMemo.sensitivity_curves``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn as nn

from sweep.assets import atomic_write, file_lock, writable

log = logging.getLogger(__name__)

FORMAT = 1  # on-disk curve format; bump when the distortion definition changes
ALLOCATION_COLUMNS = ["layer", "params", "sparsity", "zeros", "distortion"]


@dataclass(frozen=True)
class Curve:
    """One layer's measured sensitivity: ``distortion[i]`` when ``counts[i]`` weights are zeroed.

    ``counts[i] = round(levels[i] * numel)``; ``zeros0``: weights already exactly zero (free to prune).
    """

    layer: str
    numel: int
    zeros0: int
    counts: tuple[int, ...]
    distortion: tuple[float, ...]


# --------------------------------------------------------------------------- measurement


def head_maps(output: Any) -> list[torch.Tensor]:
    """The raw head maps of a model's eval output: a YOLOv5 ``(pred, [raw per level])`` gives the raw
    list; a tensor or a list/tuple of tensors is taken as it is."""
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], (list, tuple)):
        return list(output[1])
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for t in output if isinstance(t, torch.Tensor)]


def squared_error(maps: Sequence[torch.Tensor], dense: Sequence[torch.Tensor]) -> float:
    """``sum((a - b)**2)`` over matching maps (any shapes, pairwise equal), as a Python float (float64 sum)."""
    return float(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(maps, dense)))


def _top_index(name: str) -> int | None:
    """``model.<i>.…`` -> ``i``: the top-level layer a conv belongs to in a YOLOv5 ``DetectionModel``."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "model" and parts[1].isdigit() else None


def _layered(model: nn.Module) -> bool:
    """Whether partial forward passes apply: YOLOv5's ``DetectionModel`` (layers with ``f``/``i``)."""
    from sweep.model.yolo import DetectionModel

    return isinstance(model, DetectionModel) and all(hasattr(m, "f") for m in model.model)


def _run_layers(model: nn.Module, x: torch.Tensor, start: int, dense: list[Any]) -> tuple[Any, list[Any]]:
    """``DetectionModel.forward`` from top-level layer ``start`` on, the outputs of layers before it taken from
    ``dense`` (every layer's output, not only the saved ones). Returns (model output, every layer's output)."""
    outputs = list(dense[:start])
    y = dense[start - 1] if start > 0 else x
    for layer in list(model.model)[start:]:
        if layer.f != -1:
            y = outputs[layer.f] if isinstance(layer.f, int) else [y if j == -1 else outputs[j] for j in layer.f]
        y = layer(y)
        outputs.append(y)
    return y, outputs


@torch.no_grad()
def measure_curves(model: nn.Module, layers: Mapping[str, nn.Conv2d], batches: Iterable[torch.Tensor],
                   levels: Sequence[float], device: torch.device | str = "cpu") -> list[Curve]:
    """Each layer's distortion (module doc) at each level, over ``batches`` (uint8 ``[B, 3, H, W]``, 0-255).

    ``model`` (FP32, eval) is changed only while a layer is pruned and restored exactly afterwards;
    ``layers`` are its selected convs by name (network order). Returns one :class:`Curve` per layer.
    """
    model.eval().to(device)
    layered = _layered(model)
    names = list(layers)
    flat = {n: layers[n].weight.detach().flatten().clone() for n in names}
    order = {n: torch.argsort(flat[n].abs(), stable=True) for n in names}
    counts = {n: tuple(round(lv * flat[n].numel()) for lv in levels) for n in names}  # torch's round(amount * n)
    err = {n: [0.0] * len(levels) for n in names}
    energy = 0.0
    t0, images = time.perf_counter(), 0
    for batch in batches:
        x = batch.to(device).float() / 255.0
        if layered:
            out, dense = _run_layers(model, x, 0, [])
        else:
            out, dense = model(x), []
        ref = [t.detach() for t in head_maps(out)]
        energy += float(sum((t.double() ** 2).sum() for t in ref))
        for li, n in enumerate(names):
            if li and li % 10 == 0:  # the whole measurement takes minutes on a CPU: show it moves
                log.info("sensitivity curves: batch of %d images, layer %d/%d, %.0fs", int(x.shape[0]), li,
                         len(names), time.perf_counter() - t0)
            conv, w0 = layers[n], flat[n]
            start = _top_index(n) if layered else None
            for i, k in enumerate(counts[n]):
                w = w0.clone()
                w[order[n][:k]] = 0
                conv.weight.copy_(w.view_as(conv.weight))
                out = _run_layers(model, x, start, dense)[0] if start is not None else model(x)
                err[n][i] += squared_error(head_maps(out), ref)
            conv.weight.copy_(w0.view_as(conv.weight))
        images += int(x.shape[0])
        log.info("sensitivity curves: %d images, %d layers x %d levels, %.0fs so far", images, len(names),
                 len(levels), time.perf_counter() - t0)
    if images == 0 or energy == 0:
        raise ValueError("sensitivity curves need calibration images with a non-zero dense output")
    return [Curve(n, flat[n].numel(), int((flat[n] == 0).sum()), counts[n], tuple(e / energy for e in err[n]))
            for n in names]


# --------------------------------------------------------------------------- allocation


def _hull(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of ``(count, distortion)`` points sorted by count (first point kept)."""
    hull: list[tuple[int, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):  # hull[-1] on or above the chord: drop it
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def curve_points(c: Curve) -> list[tuple[int, float]]:
    """The layer's ``(zeros, distortion)`` points from its present zeros on: ``(zeros0, 0)`` then every measured
    count above it (a repeated count keeps its lowest distortion)."""
    best: dict[int, float] = {}
    for k, d in zip(c.counts, c.distortion):
        if k > c.zeros0:
            best[k] = min(d, best.get(k, d))
    return [(c.zeros0, 0.0)] + sorted(best.items())


def interpolate(c: Curve, zeros: int) -> float:
    """The curve's piecewise-linear distortion at ``zeros`` (clamped to its measured range)."""
    pts = curve_points(c)
    if zeros <= pts[0][0]:
        return pts[0][1]
    for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
        if zeros <= x2:
            return y1 + (y2 - y1) * (zeros - x1) / (x2 - x1)
    return pts[-1][1]


def allocate(curves: Sequence[Curve], total_zeros: int) -> dict[str, int]:
    """Per-layer zero counts summing to exactly ``total_zeros`` with the least total (hull) distortion.

    Every layer starts at its present zeros (``zeros0``); the hull segments of all layers are then taken in
    ascending order of distortion per weight (ties: layer order, then segment order), whole while they fit, the
    last one for the integer remainder. Raises ValueError when ``total_zeros`` is below the present zeros or
    above what the largest measured level allows.
    """
    alloc = {c.layer: c.zeros0 for c in curves}
    remaining = total_zeros - sum(alloc.values())
    capacity = sum(curve_points(c)[-1][0] for c in curves)
    if remaining < 0 or total_zeros > capacity:
        raise ValueError(f"{total_zeros} zeros cannot be allocated: the selected layers hold "
                         f"{sum(alloc.values())} zeros already and at most {capacity} at the largest measured level")
    segments = []
    for li, c in enumerate(curves):
        hull = _hull(curve_points(c))
        for si, ((x1, y1), (x2, y2)) in enumerate(zip(hull, hull[1:])):
            segments.append(((y2 - y1) / (x2 - x1), li, si, c.layer, x2 - x1))
    for _, _, _, layer, length in sorted(segments):
        if remaining == 0:
            break
        take = min(length, remaining)
        alloc[layer] += take
        remaining -= take
    return alloc


def allocation_table(curves: Sequence[Curve], zeros: Mapping[str, int]) -> pd.DataFrame:
    """One row per layer (network order): ``layer``, ``params``, ``sparsity`` allocated, ``zeros``, and the
    interpolated ``distortion`` the allocation expects for it alone."""
    rows = [{"layer": c.layer, "params": c.numel, "sparsity": zeros[c.layer] / c.numel, "zeros": int(zeros[c.layer]),
             "distortion": interpolate(c, zeros[c.layer])} for c in curves]
    return pd.DataFrame(rows, columns=ALLOCATION_COLUMNS)


def write_allocation(table: pd.DataFrame, folder: Path, sparsity: float) -> list[Path]:
    """``allocation.csv`` and ``allocation.png`` (allocated sparsity per layer) in ``folder``."""
    import matplotlib  # the plotting stack costs ~1 s of start-up: only jobs that allocate pay it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv, png = folder / "allocation.csv", folder / "allocation.png"
    table.to_csv(csv, index=False)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(table)), 3.6))
    ax.bar(range(len(table)), table["sparsity"], color="tab:blue")
    ax.axhline(sparsity, color="tab:red", lw=1, ls="--", label=f"overall {sparsity:.2f}")
    ax.set_xticks(range(len(table)), table["layer"], rotation=90, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity allocated")
    ax.set_title("prune=sensitivity: sparsity per layer")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [csv, png]


# --------------------------------------------------------------------------- identity and disk cache


def curve_key(sha256: str, fused: bool, layers: Sequence[tuple[str, int]], levels: Sequence[float],
              files: Sequence[str], imgsz: int, device_type: str) -> str:
    """Hex digest of everything the curves depend on: the model (checkpoint, fusion, selected layers and their
    sizes), the levels, the calibration images (real path, size, mtime of each, so their count too), imgsz and
    the device type (float results differ slightly between CPU and CUDA)."""
    images = []
    for f in files:
        st = os.stat(f)
        images.append([os.path.realpath(f), st.st_size, st.st_mtime_ns])
    ident = {"format": FORMAT, "sha256": sha256, "fused": bool(fused), "layers": [list(x) for x in layers],
             "levels": [float(v) for v in levels], "images": images, "imgsz": int(imgsz), "device": device_type}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class CurveStore:
    """``<root>/<key>.json``: measured curves, written atomically and verified on reading (format, key and a
    checksum of the curves); an invalid file is removed with a warning and measured again. ``root`` None: no
    disk cache."""

    def __init__(self, root: Path | None) -> None:
        self.root = Path(root) if root is not None else None

    def path(self, key: str) -> Path | None:
        return self.root / f"{key}.json" if self.root is not None else None

    def lock(self, key: str) -> ContextManager[None]:
        """Held while one process loads, measures and saves ``key`` (none without a writable cache folder)."""
        if self.root is None or not writable(self.root):
            return nullcontext()
        return file_lock(self.root / f".{key}.lock")

    @staticmethod
    def _digest(curves: list[dict[str, Any]]) -> str:
        return hashlib.sha256(json.dumps(curves, sort_keys=True).encode()).hexdigest()

    def load(self, key: str) -> list[Curve] | None:
        f = self.path(key)
        if f is None or not f.is_file():
            return None
        try:
            doc = json.loads(f.read_text())
            if doc.get("format") != FORMAT or doc.get("key") != key or doc.get("sha256") != self._digest(doc["curves"]):
                raise ValueError("format, key or checksum differs")
            return [Curve(d["layer"], int(d["numel"]), int(d["zeros0"]), tuple(int(k) for k in d["counts"]),
                          tuple(float(v) for v in d["distortion"])) for d in doc["curves"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("sensitivity curve cache %s is invalid (%s): measuring again", f, exc)
            f.unlink(missing_ok=True)
            return None

    def save(self, key: str, curves: Sequence[Curve], seconds: float) -> None:
        f = self.path(key)
        if f is None:
            return
        data = [asdict(c) for c in curves]  # tuples: JSON lists, the same digest as the lists read back
        doc = {"format": FORMAT, "key": key, "seconds": seconds, "curves": data, "sha256": self._digest(data)}
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            # atomic (a reader sees the old file or the whole new one); the temporary file is removed on failure
            atomic_write(f, lambda tmp: Path(tmp).write_text(json.dumps(doc)))
        except OSError as exc:  # a read-only or full cache folder costs a re-measurement later, not the job
            log.warning("could not store sensitivity curves in %s (%s)", f.parent, exc)
