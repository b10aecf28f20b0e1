"""python -m sweep: compose the Hydra config and run one job (or a multirun of them)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sweep.job import task
from sweep.config.schema import register_configs
from sweep.memo import SessionCache

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    register_configs()
    cache = SessionCache()  # lives for this process: checkpoints and decoded data reused across jobs

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _task(cfg: DictConfig) -> None:
        task(cfg, cache)

    _task()


if __name__ == "__main__":
    main()
