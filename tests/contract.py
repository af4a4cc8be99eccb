"""The bad-input contract as one helper for in-process CLI cases: exit code 2, exactly one `error:` line, no
traceback, nothing created or changed under the watched folder, no lock left."""

from __future__ import annotations

import time
from pathlib import Path

from tests.test_fuzz_contract import snapshot


def refused(args: list[str], watch: Path, locks: Path | None = None) -> tuple[str, float]:
    """Run `tunekit ARGS` in-process; assert the contract; return (the error line, seconds it took)."""
    from typer.testing import CliRunner

    from tunekit.cli.app import app

    before = snapshot(watch)
    started = time.perf_counter()
    result = CliRunner().invoke(app, [str(a) for a in args])
    seconds = time.perf_counter() - started
    after = snapshot(watch)
    stderr = result.stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2, (result.exit_code, stderr[-3000:], result.stdout[-1000:])
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr + result.stdout, stderr
    assert "internal error" not in errors[0], errors[0]
    assert after == before, {k for k in set(after) ^ set(before)} | {
        k for k in before if k in after and before[k] != after[k]}
    if locks is not None:
        assert not list(locks.iterdir()), "a lock was left behind"
    return errors[0], seconds
