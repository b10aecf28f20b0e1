"""Test helpers: compose the real configs, run the real CLI, query the real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")

# Shrunk settings for fast end-to-end runs on CPU.
FAST = ("eval.progress=false", "eval.latency=false")


def make_cfg(outputs: Path, *overrides: str) -> DictConfig:
    """The real config composed with ``overrides`` and outputs redirected to ``outputs``."""
    from sweep.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"paths.outputs={outputs}", f"paths.preprocessed={outputs}/pre",
                                            *FAST, *overrides])


def run_cli(outputs: Path, *args: str, sweep_dir: Path | None = None, timeout: int = 900,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m sweep ARGS`` as a user runs it, outputs under ``outputs``."""
    extra = [f"paths.outputs={outputs}", f"paths.preprocessed={outputs}/pre", *FAST]
    if sweep_dir is not None:
        extra.append(f"hydra.sweep.dir={sweep_dir}")
    full_env = os.environ.copy() | (env or {})
    return subprocess.run([sys.executable, "-m", "sweep", *args, *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def store_uri(outputs: Path) -> str:
    return f"sqlite:///{outputs.resolve() / 'mlflow.db'}"


def runs(outputs: Path, experiment: str = "yolov5-sparsity", filter_string: str = "") -> list:
    """All runs of ``experiment`` in the default store under ``outputs`` (empty when none)."""
    from mlflow.tracking import MlflowClient

    if not (outputs / "mlflow.db").exists():
        return []
    client = MlflowClient(tracking_uri=store_uri(outputs))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], filter_string, max_results=1000))


def resolved_container(cfg: DictConfig) -> dict:
    """The composed config as plain data, interpolations resolved (what the job spec starts from)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    return c
