"""Data stage: YOLO-format datasets read and letterboxed as val.py does, COCO ground truth, the on-disk batch cache."""

from sweep.data.dataset import (Batch, DataError, Dataset, coco_ground_truth, label_path, list_image_files,
                                load_data_yaml, load_ground_truth)
from sweep.data.preprocessed import PreprocessedCache

__all__ = ["Batch", "DataError", "Dataset", "PreprocessedCache", "coco_ground_truth", "label_path",
           "list_image_files", "load_data_yaml", "load_ground_truth"]
