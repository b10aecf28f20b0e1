"""Track stage: MLflow runs (parent per sweep, child per job) and the Hydra sweep callback."""

from sweep.track.tracker import Tracker, TrackingError, environment_tags

__all__ = ["Tracker", "TrackingError", "environment_tags"]
