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
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from sweep.config import register_configs
from sweep.job import task
from sweep.memo import process_memo
from sweep.process import credentials_to_environment, setup_process

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM / SIGHUP end the sweep the way Ctrl-C does (runs KILLED, summary printed)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


# Hydra's own flags that take a value (the value is no override).
_VALUE_FLAGS = {"--cfg", "-c", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--info", "-i",
                "--package", "-p", "--experimental-rerun"}


def check_override_syntax(args: list[str]) -> str | None:
    """One message naming the first command-line override Hydra's grammar rejects (Hydra's own error does
    not say which), else None."""
    parser = OverridesParser.create()
    skip = False
    for arg in args:
        if skip or arg.startswith("-"):
            skip = arg in _VALUE_FLAGS
            continue
        try:
            parser.parse_override(arg)
        except HydraException as exc:  # the grammar reports as HydraException, OverrideParseException
            detail = " ".join(str(exc).split())
            return (f"cannot parse the override {arg!r} ({detail}); allowed is key=value, with comma-separated "
                    "values for a multirun sweep, e.g. sparsity=0,0.3,0.5")
    return None


def main() -> None:
    sys.argv[1:] = credentials_to_environment(sys.argv[1:])  # before Hydra reads, writes or logs any override
    problem = check_override_syntax(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    register_configs()
    setup_process(reuse_host_memory=None)  # before Hydra logs the first override (the launcher prints them all, tracking URI included)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _task(cfg: DictConfig) -> None:
        setup_process(reuse_host_memory=bool(cfg.eval.reuse_host_memory))  # process-wide, idempotent
        task(cfg, process_memo())  # per process, not captured: a launcher pickling the task must not copy it

    try:
        _task()
    except KeyboardInterrupt as exc:
        what = str(exc) or "Ctrl-C"
        print(f"interrupted ({what}): the running job's run and the sweep's parent run are marked KILLED; "
              "run the same command again to resume (finished points are skipped)", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
