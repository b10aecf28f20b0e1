"""python -m sweep: compose the Hydra config and run one job (or a multirun of them).

Exit status: 0 every job done or skipped; 1 a job failed (the summary table says which); 2 bad input
(one message, no run created); 130 interrupted (Ctrl-C, or SIGTERM/SIGHUP as Slurm, Docker and
Kubernetes send them): the running job's MLflow run and the sweep's parent run end KILLED.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from types import FrameType

import hydra
from omegaconf import DictConfig

from sweep.config import register_configs
from sweep.job import task
from sweep.memo import ProcessMemo
from sweep.process import setup_process

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EXIT_INTERRUPTED = 130


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM / SIGHUP end the sweep the way Ctrl-C does (runs KILLED, summary printed)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    register_configs()
    memo = ProcessMemo()  # lives for this process: checkpoints and decoded data reused across jobs
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _task(cfg: DictConfig) -> None:
        setup_process(reuse_host_memory=bool(cfg.eval.reuse_host_memory))  # process-wide, idempotent
        task(cfg, memo)

    try:
        _task()
    except KeyboardInterrupt as exc:
        what = str(exc) or "Ctrl-C"
        print(f"interrupted ({what}): the running job's run and the sweep's parent run are marked KILLED; "
              "run the same command again to resume (finished points are skipped)", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
