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
    if timeout <= 0:
        raise ValueError("timeout must be > 0")
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
