"""A sandbox for untrusted generated Python: run a program against tests, score passed/total, never hang.

Each program runs in a fresh supervisor process (tunekit/rewards/sandbox_supervisor.py: namespaces, a dedicated
uid, rlimits, Landlock, process-group kill at the deadline) in a throw-away working directory that is deleted
afterwards; the program itself is executed by sandbox_runner.py. Programs run in parallel on a small thread pool;
each thread only waits on its supervisor, so a hostile program costs at most its wall-clock limit.
Hand-written on the standard library: no maintained Python package offers this confinement (the closest,
e.g. bubblewrap/nsjail, are external binaries we cannot assume are installed).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tunekit.errors import TunekitError

_HERE = Path(__file__).resolve().parent
SUPERVISOR = _HERE / "sandbox_supervisor.py"
RUNNER = _HERE / "sandbox_runner.py"
SYSTEM_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/lib32", "/usr/lib32")
# Sandbox uids: a block per tunekit process (by pid) so parallel trainers on one machine never share one.
UID_BASE = 3_000_000
UIDS_PER_PROCESS = 64


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run. `cpu_seconds` defaults to the wall-clock timeout rounded up."""

    timeout: float = 5.0
    cpu_seconds: int | None = None
    memory_mb: int = 1024
    file_size_mb: int = 16
    processes: int = 32
    open_files: int = 64

    def as_rlimits(self) -> dict:
        return {
            "cpu_seconds": self.cpu_seconds or max(1, int(-(-self.timeout // 1))),
            "memory_bytes": self.memory_mb << 20,
            "file_size_bytes": self.file_size_mb << 20,
            "processes": self.processes,
            "open_files": self.open_files,
        }


@dataclass
class SandboxResult:
    """What one run did. `passed`/`total` come from the runner's nonce-signed verdict; no verdict = 0 passed."""

    passed: int
    total: int
    exit_code: int | None
    timed_out: bool
    elapsed: float
    output: str
    layers: list[str] = field(default_factory=list)
    leftover_processes: bool = False
    verdict: bool = False
    started: bool = False
    memory_limit_hit: bool = False

    def score(self, partial: bool = False) -> float:
        """1.0 when every test passed (or passed/total with `partial`); 0.0 after a timeout, a crash before the
        verdict, or a process left running."""
        if not self.verdict or self.timed_out or self.leftover_processes or self.total == 0:
            return 0.0
        if partial:
            return self.passed / self.total
        return 1.0 if self.passed == self.total else 0.0


def _world_executable(path: str) -> bool:
    """True when a user with no groups can execute `path` (every ancestor searchable, the file o+rx)."""
    p = Path(path)
    try:
        for parent in list(p.parents):
            if not parent.stat().st_mode & stat.S_IXOTH:
                return False
        mode = p.stat().st_mode
    except OSError:
        return False
    return bool(mode & stat.S_IXOTH and mode & stat.S_IROTH)


@functools.cache
def sandbox_interpreter(preferred: str | None = None) -> str:
    """The Python that runs sandboxed code: `preferred`, else this interpreter when the sandbox uid can run it,
    else the system python3 (generated code needs only the standard library)."""
    candidates = [preferred] if preferred else []
    base = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    candidates += [base, os.path.realpath(sys.executable)]
    if not preferred:
        candidates += [os.path.realpath(p) for p in (shutil.which("python3"), "/usr/bin/python3") if p]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and (os.geteuid() != 0 or _world_executable(candidate)):
            return candidate
    raise TunekitError(
        "code_tests: no Python interpreter the sandbox user can run (this one lies in a folder other users "
        "cannot enter); install a system python3 or name one with `interpreter:`"
    )


@functools.cache
def _interpreter_read_paths(interpreter: str) -> tuple[str, ...]:
    """Folders the sandboxed interpreter must read: its standard library, lib-dynload and shared libraries."""
    probe = (
        "import json, sys, sysconfig; p = sysconfig.get_paths();"
        "print(json.dumps([p['stdlib'], p['platstdlib'], sysconfig.get_config_var('LIBDIR') or ''] + sys.path))"
    )
    out = subprocess.run([interpreter, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True)
    paths = [interpreter] + [p for p in json.loads(out.stdout) if p and os.path.isdir(p)]
    paths += [p for p in SYSTEM_LIBRARY_DIRS if os.path.isdir(p)]
    paths += [p for p in ("/etc/ld.so.cache",) if os.path.isfile(p)]
    return tuple(dict.fromkeys(paths))


class _UidPool:
    """Hands out sandbox uids so that no two concurrent runs share one (RLIMIT_NPROC counts per uid, and the
    sweep kills every process of the uid). Within a process a lock guards the free list; across processes (two
    trainers whose pids share a uid block) an flock on `<tmp>/tunekit-sandbox-uids/<uid>.lock` does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free = [UID_BASE + (os.getpid() % 30_000) * UIDS_PER_PROCESS + i for i in range(UIDS_PER_PROCESS)]
        self._held: dict[int, int] = {}

    def acquire(self) -> int:
        import fcntl

        folder = Path(tempfile.gettempdir()) / "tunekit-sandbox-uids"
        as_root = os.geteuid() == 0  # without root no uid is switched to: nothing to share
        if as_root:
            folder.mkdir(mode=0o700, exist_ok=True)
        with self._lock:
            for uid in list(self._free):
                if not as_root:
                    self._free.remove(uid)
                    return uid
                fd = os.open(folder / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    continue
                self._free.remove(uid)
                self._held[uid] = fd
                return uid
        raise RuntimeError("sandbox: more concurrent runs than sandbox uids")

    def release(self, uid: int) -> None:
        with self._lock:
            fd = self._held.pop(uid, None)
            if fd is not None:
                os.close(fd)  # closing drops the flock
            self._free.append(uid)


_UIDS = _UidPool()


class Sandbox:
    """Run untrusted Python against tests. `namespaces`/`landlock`/`cgroups`/`seccomp` switch kernel layers off (to test
    the fallbacks); `workers` bounds how many programs run at once."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        workers: int | None = None,
        interpreter: str | None = None,
        namespaces: bool = True,
        landlock: bool = True,
        cgroups: bool = True,
        tmp_dir: str | None = None,
        seccomp: bool = True,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.interpreter = sandbox_interpreter(interpreter)
        self.read_paths = list(_interpreter_read_paths(self.interpreter))
        self.namespaces = namespaces
        self.landlock = landlock
        self.cgroups = cgroups
        self.seccomp = seccomp
        self.tmp_dir = tmp_dir
        self._runner_source = RUNNER.read_text()

    def run(self, code: str, tests: str | list[str]) -> SandboxResult:
        """Run `code`, then each test (an assert statement, or a list of them) in the same namespace."""
        uid = _UIDS.acquire()
        workdir = tempfile.mkdtemp(prefix="tunekit-sandbox-", dir=self.tmp_dir)
        try:
            return self._run_in(workdir, uid, code, tests)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            _UIDS.release(uid)

    def run_many(self, jobs: list[tuple[str, str | list[str]]]) -> list[SandboxResult]:
        """Run (code, tests) pairs in parallel on `workers` threads; results in input order."""
        if len(jobs) <= 1 or self.workers == 1:
            return [self.run(code, tests) for code, tests in jobs]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(jobs))) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    def _run_in(self, workdir: str, uid: int, code: str, tests: str | list[str]) -> SandboxResult:
        nonce = secrets.token_hex(16)
        payload = Path(workdir) / ".payload.json"
        payload.write_text(json.dumps({"nonce": nonce, "code": code, "tests": tests, "read_paths": self.read_paths}))
        is_root = os.geteuid() == 0
        if is_root:
            os.chown(workdir, uid, uid)
            os.chown(payload, uid, uid)
        os.chmod(workdir, 0o700)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        job = {
            "workdir": workdir,
            "uid": uid,
            "gid": uid,
            "limits": self.limits.as_rlimits(),
            "timeout": self.limits.timeout,
            "interpreter": self.interpreter,
            "runner": self._runner_source,
            "read_paths": self.read_paths,
            "namespaces": self.namespaces,
            "landlock": self.landlock,
            "cgroups": self.cgroups,
            "seccomp": self.seccomp,
            "env": env,
        }
        result = _parse(_supervise(job, self.limits.timeout + 15.0, uid if is_root else None), nonce)
        if not result.started and not result.timed_out:
            # The runner prints its start line before the program runs, so this is the sandbox's failure, never
            # the program's: say so instead of scoring every completion 0.
            raise TunekitError(f"code_tests: the sandbox itself failed ({_last_line(result.output)}); "
                               f"layers: {', '.join(result.layers) or 'none'}")
        return result


def _clean_up_after(supervisor_pid: int, uid: int | None) -> None:
    """After a supervisor died or overstayed: kill what its program started (by uid) and remove its cgroups."""
    if uid is None:
        return
    from tunekit.rewards.sandbox_supervisor import _remove_cgroups, _sweep_uid, cgroup_folders

    _sweep_uid(uid)
    try:
        folders, _ = cgroup_folders(f"tunekit-sandbox-{supervisor_pid}")
    except OSError:
        return
    _remove_cgroups([folder for folder, _ in folders if os.path.isdir(folder)])


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def _supervise(job: dict, outer_timeout: float, sweep_uid: int | None) -> dict:
    """Start the supervisor (its own session) and wait for its one-line report; kill it if it overstays."""
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", str(SUPERVISOR)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    try:
        out, err = proc.communicate(json.dumps(job).encode(), timeout=outer_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the program dies with it (PR_SET_PDEATHSIG) ...
        proc.communicate()
        _clean_up_after(proc.pid, sweep_uid)
        return {"exit_code": None, "timed_out": True, "elapsed": outer_timeout, "output": "supervisor timed out"}
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        _clean_up_after(proc.pid, sweep_uid)
        tail = err.decode("utf-8", "replace").strip().splitlines()
        return {"exit_code": proc.returncode, "timed_out": False, "elapsed": 0.0,
                "output": f"supervisor exited with {proc.returncode}" + (f": {tail[-1]}" if tail else "")}


def _parse(report: dict, nonce: str) -> SandboxResult:
    output = report.get("output", "")
    passed = total = 0
    leftover = bool(report.get("leftover_processes", False))
    verdict = False
    lines = output.splitlines()
    started = f"{nonce} started" in lines
    for line in reversed(lines):
        parts = line.split()
        if len(parts) == 4 and parts[0] == nonce:
            passed, total, leftover_flag = int(parts[1]), int(parts[2]), parts[3] == "1"
            leftover = leftover or leftover_flag
            verdict = True
            break
    program_output = "\n".join(line for line in lines if not line.startswith(nonce))
    return SandboxResult(
        passed=passed,
        total=total,
        exit_code=report.get("exit_code"),
        timed_out=bool(report.get("timed_out")),
        elapsed=float(report.get("elapsed", 0.0)),
        output=program_output[-4000:],
        layers=list(report.get("layers", [])),
        leftover_processes=leftover,
        verdict=verdict,
        started=started,
        memory_limit_hit=bool(report.get("memory_limit_hit", False)),
    )
