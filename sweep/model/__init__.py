"""Model stage: YOLOv5 built from its yaml rows, Conv+BN fusion, safe checkpoint loading and saving."""

from sweep.model.artifact import ArtifactFiles, artifact_sizes, load_artifact, save_artifact
from sweep.model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, save_checkpoint
from sweep.model.yolo import MODULES, DetectionModel, ModelError, build_model, fuse, is_fused, load_model_yaml

__all__ = ["MODULES", "ArtifactFiles", "CheckpointError", "DetectionModel", "LoadedCheckpoint", "ModelError",
           "artifact_sizes", "build_model", "fuse", "load_artifact", "save_artifact",
           "is_fused", "load_checkpoint", "load_model_yaml", "save_checkpoint"]
