"""The one error type users see: a single line on stderr and exit code 2, never a traceback."""

from __future__ import annotations


class TunekitError(Exception):
    """Bad input from the user (recipe, data, paths). The CLI prints `error: <message>` and exits 2."""

    exit_code = 2
