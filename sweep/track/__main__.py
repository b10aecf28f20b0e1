"""``python -m sweep.track upload [--outputs DIR] [--tracking-uri URI] [--experiment NAME] [--wait SECONDS]``:
upload the run records a tracking outage left in ``<outputs>/spool/``.

Exit status: 0 nothing left pending, 3 records still pending (the store did not answer), 2 bad input."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from sweep import contract
from sweep.process import setup_process
from sweep.track.spool import EXIT_PENDING, pending, store_key, upload_pending
from sweep.track.tracker import Tracker, TrackingError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep.track",
                                description="Upload the MLflow run records that waited in the local spool while "
                                            "the tracking store did not answer.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upload", help="replay the spooled records into their store")
    up.add_argument("--outputs", default=contract.DEFAULT_OUTPUTS, metavar="DIR",
                    help="the sweep's paths.outputs (the spool is DIR/spool; default: outputs)")
    up.add_argument("--tracking-uri", default=None, metavar="URI",
                    help="the store (default: $MLFLOW_TRACKING_URI, else sqlite:///<DIR>/mlflow.db)")
    up.add_argument("--experiment", default=contract.DEFAULT_EXPERIMENT, metavar="NAME")
    up.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                    help="how long to keep trying a store that does not answer (default 30)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    setup_process(reuse_host_memory=None)  # MLflow's unredacted "View run at <URI>" lines off, log lines redacted
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outputs = Path(args.outputs).expanduser().resolve()
    spool = outputs / contract.SPOOL_DIR
    uri = contract.tracking_uri(args.tracking_uri, outputs)
    if args.wait < 0:
        print(f"sweep.track: error: --wait={args.wait:g} is invalid: allowed is a number of seconds >= 0",
              file=sys.stderr)
        return 2
    key = store_key(uri, args.experiment)
    if not pending(spool, key):
        others = len(pending(spool))
        print(f"nothing pending for {contract.redact(uri)} (experiment {args.experiment}) in {spool}"
              + (f"; {others} record(s) there belong to another store or experiment" if others else ""))
        return 0
    try:
        default_uri, default_artifacts = contract.default_store(outputs)
        tracker = Tracker(uri, args.experiment, default_artifacts if uri == default_uri else None,
                          retry_window=args.wait)
        uploaded, left = upload_pending(tracker, spool)
    except TrackingError as exc:
        print(f"sweep.track: {exc}", file=sys.stderr)
        return EXIT_PENDING
    print(f"uploaded {uploaded} run record(s) to {contract.redact(uri)}; {left} still pending in {spool}")
    return EXIT_PENDING if left else 0


if __name__ == "__main__":
    sys.exit(main())
