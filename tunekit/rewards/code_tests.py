"""`code_tests`: run the completion's Python against the record's tests in the sandbox (tunekit/rewards/sandbox.py).

Score = 1.0 when every test passes (passed / total with `partial: true`), 0.0 on a failure, a crash, a timeout
or a process left running — the unit-test reward of code RL (e.g. CodeRL, Le et al., 2022).
"""

from __future__ import annotations

import re
import threading

from tunekit.errors import TunekitError
from tunekit.rewards.registry import register_reward
from tunekit.rewards.text import completion_text

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The last ```python (or ```py) block; else the last fenced block; else the whole text. An unclosed fence
    (a truncated completion) runs to the end."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for lang, body in reversed(blocks):
        if lang in ("python", "py", "python3"):
            return body
    if blocks:
        return blocks[-1][1]
    return text


@register_reward("code_tests")
def code_tests(column: str = "tests", timeout: float = 5.0, memory_mb: int = 1024, processes: int = 32,
               open_files: int = 64, file_size_mb: int = 16, cpu_seconds: int | None = None, workers: int | None = None,
               partial: bool = False, interpreter: str | None = None):
    """Build the reward; the limits are per program (see SandboxLimits)."""
    import sys

    from tunekit.rewards.sandbox import SandboxLimits

    if not sys.platform.startswith("linux"):
        raise ValueError("code_tests runs generated code in a Linux sandbox (namespaces, Landlock); not on "
                         f"{sys.platform}")
    import math

    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a finite number > 0, got {timeout!r}")
    # a Python interpreter needs ~30 MB of address space before the program's first line: below 64 MB every
    # program would fail and the sandbox would be blamed
    for key, value, low in (("memory_mb", memory_mb, 64), ("processes", processes, 1), ("open_files", open_files, 8),
                            ("file_size_mb", file_size_mb, 1), ("cpu_seconds", cpu_seconds, 1),
                            ("workers", workers, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{key} must be a whole number >= {low}, got {value!r}")
    if interpreter is not None:  # checked now, not at the first reward call inside training
        import subprocess

        from tunekit.rewards.sandbox import _interpreter_read_paths, sandbox_interpreter

        try:
            _interpreter_read_paths(sandbox_interpreter(interpreter))
        except (OSError, subprocess.CalledProcessError, ValueError):
            raise ValueError(f"interpreter '{interpreter}' is not a Python 3 interpreter this sandbox can run") \
                from None
    limits = SandboxLimits(timeout=float(timeout), cpu_seconds=cpu_seconds, memory_mb=int(memory_mb),
                           file_size_mb=int(file_size_mb), processes=int(processes), open_files=int(open_files))
    state: dict = {}
    lock = threading.Lock()

    def sandbox():
        with lock:
            if "sandbox" not in state:
                from tunekit.rewards.sandbox import Sandbox

                state["sandbox"] = Sandbox(limits, workers=workers, interpreter=interpreter)
            return state["sandbox"]

    def reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float | None]:
        if column not in columns:
            raise TunekitError(f"reward 'code_tests' reads the column '{column}', which the data lacks "
                               f"(set `column:` in the reward)")
        jobs, where = [], []
        out: list[float | None] = [None] * len(completions)
        for i, (completion, tests) in enumerate(zip(completions, columns[column])):
            if tests is None or (isinstance(tests, (str, list)) and not tests):
                continue
            jobs.append((extract_code(completion_text(completion)), tests if isinstance(tests, list) else str(tests)))
            where.append(i)
        if jobs:
            for i, result in zip(where, sandbox().run_many(jobs)):
                out[i] = result.score(partial)
        return out

    reward.__name__ = "code_tests"
    reward.columns = (column,)
    return reward
