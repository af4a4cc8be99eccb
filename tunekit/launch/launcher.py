"""`python -m tunekit.launch.launcher ARGS` = `accelerate launch ARGS`, without the launcher's failure report when
a worker has already reported its error.

A worker that stops on an error hands its one `error:` line to the launching tunekit process through the file
named by `TUNEKIT_WORKER_ERROR_FILE` (`tunekit.errors.hand_to_launcher`) and exits. torch.distributed's agent
would then log each worker's exit code and raise a ChildFailedError whose traceback and report (tens of lines)
say nothing the error line does not: once that file exists, both are dropped and this process exits with the
worker's code. Any other launcher failure (a worker killed by a signal, a rendezvous error) is reported as before.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tunekit.errors import WORKER_ERROR_ENV, worker_error


class _UnlessAWorkerReported(logging.Filter):
    """Drops every log record once a worker has recorded its error (they only restate it)."""

    def __init__(self, report: Path):
        super().__init__()
        self.report = report

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.report.is_file()


def _quiet_once_reported(report: Path) -> None:
    """Attach the filter to every log handler of this process (torch.distributed's agent logs through them)."""
    quiet = _UnlessAWorkerReported(report)
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger))]
    for handler in {h for lg in loggers for h in lg.handlers} | {logging.lastResort}:
        if handler is not None:
            handler.addFilter(quiet)


def main() -> int:
    """Run `accelerate launch` with this process's arguments; the exit code to end with."""
    import torch.distributed.run  # noqa: F401 - its loggers and handlers exist before the filter is attached
    from accelerate.commands.launch import launch_command, launch_command_parser

    path = os.environ.get(WORKER_ERROR_ENV)
    report = Path(path) if path else None
    if report is not None:
        _quiet_once_reported(report)
    args = launch_command_parser().parse_args()
    try:
        launch_command(args)
    except Exception:
        found = worker_error(report) if report is not None else None
        if found is None:
            raise
        return found[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
