"""Model stage: YOLOv5 built from its yaml rows, Conv+BN fusion, safe checkpoint loading and saving."""

from sweep.model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from sweep.model.yolo import MODULES, DetectionModel, ModelError, build_model, fuse, is_fused, load_model_yaml

__all__ = ["MODULES", "CheckpointError", "DetectionModel", "LoadedCheckpoint", "ModelError", "build_model", "fuse",
           "is_fused", "load_checkpoint", "load_model_yaml", "save_checkpoint"]
