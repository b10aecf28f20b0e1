"""Per-process reuse across the jobs of a sweep.

With the default (sequential) launcher every job of a multirun runs in one process. The
``SessionCache`` keeps what does not depend on the pruning: each checkpoint loaded once
(every job gets a fresh deep copy), each weights file hashed once, and each dataset decoded
and letterboxed once per (data, imgsz, stride, batch) setting, so the Nth job costs only
prune + inference + NMS + COCO eval. Created by the entry point, passed explicitly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Keep decoded batches in memory only up to this many bytes (COCO val2017 at 640 is ~4.6 GB).
MAX_CACHED_BYTES = 3 * 1024**3


@dataclass
class DataSpec:
    """A dataset resolved from ``cfg.data``: where the images, labels and annotations are."""

    name: str
    root: Path
    val: Any                                 # images dir, list file or list, relative to root
    annotations: Path | None = None          # official COCO JSON (ground truth) when present
    coco80_to_91: bool = False
    names: list[str] | None = None
    train: Any = None
    limit: int | None = None

    def source(self, split: str = "val") -> Any:
        """The split's images (folder, list file or list) as absolute paths."""
        spec = self.val if split == "val" else self.train
        if isinstance(spec, (list, tuple)):
            return [str(self.root / Path(str(s)).expanduser()) for s in spec]  # an absolute s stays absolute
        return str(self.root / Path(str(spec)).expanduser())


@dataclass
class EvalData:
    """A dataset ready for evaluation: batches source, ground truth and id mappings."""

    dataset: Any
    ground_truth: dict[str, Any]
    eval_image_ids: list[Any]
    class_map: list[int]
    instances: int
    batches: list[Any] | None = None

    @property
    def skipped(self) -> list[Any]:
        return list(getattr(self.dataset, "skipped", []))

    def __len__(self) -> int:
        return len(self.eval_image_ids)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@dataclass
class SessionCache:
    checkpoints: dict[tuple[str, float], Any] = field(default_factory=dict)
    hashes: dict[tuple[str, float, int], str] = field(default_factory=dict)
    data: dict[tuple, EvalData] = field(default_factory=dict)
    dense: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    calib: dict[tuple, Any] = field(default_factory=dict)

    # -- weights ------------------------------------------------------------------------------
    def weights_path(self, model_cfg: DictConfig, cache_dir: Path) -> Path:
        """The checkpoint file for ``model_cfg`` (downloaded into the cache when missing)."""
        from sweep.assets import resolve_weights
        from sweep.model.checkpoint import load_checkpoint

        return resolve_weights(str(model_cfg.name), cache_dir, model_cfg.weights, model_cfg.url,
                               verify=load_checkpoint)

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        if key not in self.hashes:
            from sweep.assets import file_sha256

            self.hashes[key] = file_sha256(path)
        return self.hashes[key]

    def checkpoint(self, path: Path) -> Any:
        """The loaded checkpoint (pristine; callers deep-copy its model before changing it)."""
        from sweep.model.checkpoint import load_checkpoint

        key = (str(path), path.stat().st_mtime)
        if key not in self.checkpoints:
            self.checkpoints.clear()  # one model at a time: a grid sweeps sparsity within each model
            self.checkpoints[key] = load_checkpoint(path, self.sha256(path))  # hashed once per file
        return self.checkpoints[key]

    def dense_accounting(self, path: Path, pristine: Any, imgsz: int) -> dict[str, Any]:
        """Cost figures of the dense fused model (the reference for params/GFLOPs ratios)."""
        import copy

        from sweep.prune.accounting import accounting
        from sweep.model.yolo import fuse

        key = (self.sha256(path), imgsz)
        if key not in self.dense:
            self.dense[key] = accounting(fuse(copy.deepcopy(pristine).float().eval()), None, imgsz)[0]
        return self.dense[key]

    # -- data ---------------------------------------------------------------------------------
    def data_spec(self, data_cfg: DictConfig, cache_dir: Path) -> DataSpec:
        """Resolve ``cfg.data`` to paths on disk (downloading a configured dataset when missing)."""
        from sweep.assets import ensure_dataset
        from sweep.data.dataset import DataError, load_data_yaml

        if data_cfg.yaml:
            y = load_data_yaml(Path(str(data_cfg.yaml)).expanduser())
            root = Path(y["path"])
            spec = DataSpec(str(data_cfg.name), root, y["val"], None, False, y.get("names"), y.get("train"),
                            data_cfg.limit)
        else:
            if not data_cfg.path:
                raise DataError("data.path is empty: allowed is a dataset folder (or data.yaml=<YOLOv5 data yaml>)")
            root = Path(str(data_cfg.path)).expanduser()
            if not root.is_dir() and data_cfg.download:
                if root.resolve() != (cache_dir / "datasets" / str(data_cfg.name)).resolve():
                    raise DataError(f"data.path={str(root)!r}: missing, and a download goes only into the cache "
                                    f"({cache_dir / 'datasets' / str(data_cfg.name)})")
                ensure_dataset(str(data_cfg.name), cache_dir, _plain(data_cfg.download))
            ann = root / str(data_cfg.annotations) if data_cfg.annotations else None
            spec = DataSpec(str(data_cfg.name), root, _plain(data_cfg.val), ann, bool(data_cfg.coco80_to_91),
                            list(data_cfg.names) if data_cfg.names else None, _plain(data_cfg.train),
                            data_cfg.limit)
        if not spec.root.is_dir():
            raise DataError(f"data.path={str(spec.root)!r}: the dataset folder does not exist; allowed is an existing "
                            f"folder with images/ and labels/ (set SWEEP_CACHE or paths.cache, or data.path)")
        vals = spec.source()
        for p in map(Path, vals if isinstance(vals, list) else [vals]):
            if not p.exists():
                raise DataError(f"data.val={str(spec.val)!r}: {p} does not exist; allowed is an images folder or list file "
                                f"under data.path={str(spec.root)!r}")
        if spec.annotations is not None and not spec.annotations.is_file():
            raise DataError(f"data.annotations={str(data_cfg.annotations)!r}: {spec.annotations} does not exist")
        return spec

    def dataset(self, spec: DataSpec, cfg: DictConfig, stride: int, names: list[str]) -> EvalData:
        """The evaluation data for ``spec`` at the config's imgsz/batch and the model's stride."""
        from sweep.data.dataset import Dataset, coco_ground_truth

        imgsz, batch = int(cfg.eval.imgsz), int(cfg.eval.batch)
        key = (spec.name, str(spec.root), json.dumps(spec.val, default=str), spec.limit, imgsz, stride, batch)
        if key in self.data:
            return self.data[key]
        class_names = spec.names or list(names)
        ds = Dataset(spec.source(), class_names, imgsz=imgsz, stride=stride, batch=batch, limit=spec.limit,
                     workers=int(cfg.eval.workers), coco80_to_91=spec.coco80_to_91)
        class_map = list(ds.class_map)
        if spec.annotations is not None:
            gt = json.loads(spec.annotations.read_text())
            ids = set(ds.image_ids)
            instances = sum(1 for a in gt["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0))
        else:
            gt = coco_ground_truth(ds)
            instances = len(gt["annotations"])
        data = EvalData(ds, gt, list(ds.image_ids), class_map, instances)
        self.data = {k: v for k, v in self.data.items() if k[:4] == key[:4]}  # keep one dataset's settings
        self.data[key] = data
        return data

    def batches(self, data: EvalData, preprocessed: str | None = None) -> Iterable[Any]:
        """Decoded batches: from memory after the first pass when they fit ``MAX_CACHED_BYTES``;
        else from the on-disk cache under ``preprocessed`` (when given and writable); else decoded."""
        if data.batches is not None:
            return data.batches
        return self._fill(data, self._source(data, preprocessed))

    @staticmethod
    def _source(data: EvalData, preprocessed: str | None) -> Iterable[Any]:
        from sweep.data.preprocessed import PreprocessedCache, writable

        if preprocessed:
            root = Path(str(preprocessed)).expanduser()
            if writable(root):
                return PreprocessedCache(root).batches(data.dataset)
            log.info("preprocessed cache %s is read-only: decoding images instead", root)
        return data.dataset.iter_batches()

    def _fill(self, data: EvalData, source: Iterable[Any]) -> Iterator[Any]:
        kept: list[Any] = []
        size = 0
        for b in source:
            size += b.images.numel()
            if size <= MAX_CACHED_BYTES:
                kept.append(b)
            yield b
        if size <= MAX_CACHED_BYTES:
            data.batches = kept

    def calibration(self, cfg: DictConfig, spec: DataSpec, device: Any) -> Any:
        """Calibration images for ``cfg.recover`` (None for ``recover=none``), checked against the
        evaluation images; cached per (recover settings, imgsz, evaluation set)."""
        from sweep.data.dataset import list_image_files
        from sweep.recover.methods import calibration_source

        if cfg.recover.method == "none":
            return None
        key = ("calibration", json.dumps(OmegaConf.to_container(cfg.recover, resolve=True), sort_keys=True),
               str(cfg.data.train), int(cfg.eval.imgsz), json.dumps(spec.val, default=str), spec.limit, str(device))
        if key not in self.calib:
            files = list_image_files(spec.source())
            if spec.limit is not None:
                files = files[: int(spec.limit)]
            self.calib = {key: calibration_source(cfg, files, device)}
        return self.calib[key]
