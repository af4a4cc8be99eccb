"""The one output guard: every command that writes (run directories, merge/quantize outputs, `eval -o`, later
stages) asks here before any work, so the same rules hold everywhere:

- an existing output is replaced only with `--overwrite` (and only once the new one is complete, see atomic.py);
- an output that is, contains or lies inside one of the command's inputs is refused (it would destroy them);
- the destination is checked writable (a real probe file in the nearest existing folder) before any work;
- an exclusive lock on the output refuses a second writer; the lock is a `flock` on a lock file that holds the
  writer's pid, so the kernel drops it when the writer dies and a later writer takes it over (with a note);
- no folder is created here: parents are made only when the result is committed (`atomic.commit`).

Locks live in one folder (`$TUNEKIT_LOCK_DIR`, default `<tmp>/tunekit-locks`), named by a hash of the output's
absolute path, so nothing is ever written next to an output that is refused. Written by hand: no library we
use offers an output lock with stale-owner takeover (filelock has no owner pid and no takeover report).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tunekit.errors import TunekitError


def lock_dir() -> Path:
    """Where output locks live: `$TUNEKIT_LOCK_DIR`, else `<tmp>/tunekit-locks` (shared by every user)."""
    return Path(os.environ.get("TUNEKIT_LOCK_DIR") or Path(tempfile.gettempdir()) / "tunekit-locks")


def absolute(path: str | Path) -> Path:
    """`path` made absolute with symlinks of its existing part resolved (the same output, however spelled)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def nearest_existing(path: Path) -> Path:
    """The closest ancestor of `path` (or `path` itself) that exists."""
    p = absolute(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def local_inputs(inputs: Iterable[str | Path | None]) -> list[Path]:
    """The inputs that are paths on this machine (hub ids and aliases are not files and cannot collide)."""
    out = []
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = Path(str(item)).expanduser()
        if p.exists():
            out.append(absolute(p))
    return out


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_overlap(output: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, contains or lies inside an input."""
    out = absolute(output)
    for inp in local_inputs(inputs):
        if out == inp:
            raise TunekitError(f"output '{output}' is an input of this command; choose another output")
        if _inside(inp, out):
            raise TunekitError(
                f"output '{output}' contains the input '{inp}'; replacing it would destroy it: choose another output"
            )
        if inp.is_dir() and _inside(out, inp):
            raise TunekitError(f"output '{output}' lies inside the input '{inp}'; write it somewhere else")


def check_writable(output: str | Path) -> None:
    """Fail unless a file can be created where `output` will be committed (probed, not guessed from modes)."""
    out = absolute(output)
    anchor = nearest_existing(out.parent)
    if not anchor.is_dir():
        raise TunekitError(f"output '{output}': '{anchor}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tunekit-probe-", dir=anchor)
    except OSError as exc:
        raise TunekitError(f"output '{output}': cannot write in '{anchor}' ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check(output: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Every check that needs no lock: exists → needs overwrite; overlap with inputs; writable. Creates nothing."""
    path = Path(output)
    check_overlap(path, inputs)
    check_replaceable(path, overwrite)
    check_writable(path)
    return path


def check_replaceable(path: Path, overwrite: bool) -> None:
    """An existing output needs `overwrite`; even then a folder that is plainly not an output (the home or the
    current folder or one above it, a git checkout, the file system root) is never replaced."""
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise TunekitError(f"output '{path}' already exists; pass --overwrite to replace it")
    if path.is_dir() and not path.is_symlink():
        real = absolute(path)
        cwd = absolute(Path.cwd())
        why = ("your home folder" if real == absolute(Path.home()) else
               "the current folder or one above it" if real == cwd or real in cwd.parents else
               "a git checkout" if (real / ".git").exists() else None)
        if why:
            raise TunekitError(f"output '{path}' is {why}; refusing to replace it even with --overwrite")


@dataclass
class OutputLock:
    """An exclusive lock on one output, held until `release()` (or the process ends)."""

    output: Path
    lock_file: Path
    fd: int
    took_over: int | None = None  # pid of a dead writer whose lock was taken over
    released: bool = field(default=False)
    depth: int = 1  # nested acquisitions in this process (a stage calling a library function that locks too)

    def release(self) -> None:
        if self.released:
            return
        self.depth -= 1
        if self.depth > 0:
            return
        self.released = True
        try:
            os.unlink(self.lock_file)  # while still holding it: a waiting writer re-checks the inode
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        _HELD.pop(self.output, None)

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[Path, OutputLock] = {}


def lock_file_for(output: str | Path) -> Path:
    out = absolute(output)
    digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return lock_dir() / f"{out.name[:40]}-{digest}.lock"


def _owner(lock_file: Path) -> dict:
    try:
        return json.loads(lock_file.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def lock(output: str | Path) -> OutputLock:
    """Take the exclusive lock on `output`, or raise naming the live writer that holds it."""
    out = absolute(output)
    if out in _HELD:  # the same process (a stage calling a library function) already holds it
        _HELD[out].depth += 1
        return _HELD[out]
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(directory, 0o1777)
    except OSError:
        pass
    path = lock_file_for(out)
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = _owner(path)
            who = f"pid {owner['pid']}" if owner.get("pid") else "another process"
            since = f" since {owner['started']}" if owner.get("started") else ""
            raise TunekitError(
                f"output '{output}' is being written by {who}{since}; wait for it to finish or choose another output"
            ) from None
        # the holder may have unlinked the file between our open and our lock: then lock the new file
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        previous = _owner(path).get("pid")
        took_over = previous if isinstance(previous, int) and previous != os.getpid() else None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "output": str(out),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:6]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        held = OutputLock(out, path, fd, took_over)
        _HELD[out] = held
        if took_over is not None:
            print(f"note: took over the lock of '{output}' left by process {took_over}, which is gone",
                  file=sys.stderr)
        return held
    raise TunekitError(f"output '{output}': could not take its lock at {path}")


def acquire(output: str | Path, inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> OutputLock:
    """`check()` then `lock()`, then `check()` again (the output may have appeared while we waited)."""
    inputs = list(inputs)
    check(output, inputs, overwrite)
    held = lock(output)
    try:
        check(output, inputs, overwrite)
    except BaseException:
        held.release()
        raise
    return held


def make_parents(path: Path) -> list[Path]:
    """Create the missing parents of `path`; return the ones created (deepest last), to undo on failure."""
    created = []
    p = absolute(path).parent
    missing = []
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        d.mkdir()
        created.append(d)
    return created


def remove_empty(folders: list[Path]) -> None:
    """Undo `make_parents`: remove the folders it created, deepest first, if they are still empty."""
    for d in reversed(folders):
        try:
            d.rmdir()
        except OSError:
            break
