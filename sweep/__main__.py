"""python -m sweep: compose the Hydra config and run one job (or a multirun of them)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sweep.config import register_configs
from sweep.job import task
from sweep.memo import ProcessMemo
from sweep.process import setup_process

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    register_configs()
    memo = ProcessMemo()  # lives for this process: checkpoints and decoded data reused across jobs

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _task(cfg: DictConfig) -> None:
        setup_process(reuse_host_memory=bool(cfg.eval.reuse_host_memory))  # process-wide, idempotent
        task(cfg, memo)

    _task()


if __name__ == "__main__":
    main()
