"""``python -m sweep.report [--tracking-uri URI] [--experiment NAME] [--sweep ID | --parent-run-id ID | --all]
[--out DIR] [--no-attach]``: build a sweep report. Errors: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .build import build_report
from .common import ALL, DEFAULT_EXPERIMENT, ReportError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweep.report",
                                description="Build the report (figures, tables, PDF) of a pruning sweep "
                                            "from its MLflow runs.")
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///<cwd>/outputs/mlflow.db)")
    p.add_argument("--experiment", metavar="NAME", default=DEFAULT_EXPERIMENT, help=f"experiment name (default {DEFAULT_EXPERIMENT})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sweep", metavar="ID", help="sweep id (tag sweep_id); default: the most recent sweep")
    g.add_argument("--parent-run-id", metavar="ID", help="the sweep's parent run id")
    g.add_argument("--all", action="store_true", help="every finished job run of the experiment")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="reports root; the report goes to DIR/<sweep id> (default outputs/reports)")
    p.add_argument("--no-attach", action="store_true", help="do not log the files on the parent run")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = build_report(args.tracking_uri, args.experiment,
                           sweep=ALL if args.all else args.sweep, out_root=args.out or None,
                           parent_run_id=args.parent_run_id, attach=not args.no_attach)
    except KeyboardInterrupt:
        print("sweep.report: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, no traceback
        if args.debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "" if isinstance(e, ReportError) else f"{type(e).__name__}: "
        print(f"sweep.report: error: {kind}{msg}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
