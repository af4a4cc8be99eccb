"""Runs inside the sandbox (passed to `python -I -S -c`): executes a program, then its tests, one by one.

It reads its job from `.payload.json` in the working directory and deletes it before the program runs, so the
program sees neither the tests nor the nonce. The verdict is one line `<nonce> <passed> <total> <leftover>`
written to a private copy of stdout; a program that exits early (`os._exit(0)`) therefore leaves no verdict and
scores 0. An audit hook refuses the introspection that could read the nonce (frames, gc, ctypes) and, where the
kernel offers no network or file isolation (TUNEKIT_SANDBOX_GUARDS=net,fs), refuses sockets, file access outside
the working directory and the standard library, and starting new programs (their children would run unhooked).
The audit hook is a guard against accidents and reward hacking, not a security boundary on its own.
"""

import ast
import json
import os
import sys


def _main() -> None:
    with open(".payload.json", encoding="utf-8") as f:
        job = json.load(f)
    os.unlink(".payload.json")
    nonce = job.pop("nonce")
    verdict_fd = os.dup(1)
    os.write(verdict_fd, f"\n{nonce} started\n".encode())  # before the program: proof the sandbox itself works
    guards = set(filter(None, os.environ.get("TUNEKIT_SANDBOX_GUARDS", "").split(",")))
    in_pidns = os.environ.get("TUNEKIT_SANDBOX_PIDNS") == "1" and os.getpid() == 1
    cwd = os.path.realpath(os.getcwd())
    readable = tuple(os.path.realpath(p) for p in job["read_paths"]) + (cwd,)
    realpath, fspath, isabs, join = os.path.realpath, os.fspath, os.path.isabs, os.path.join
    deny = PermissionError

    def _under(path, roots) -> bool:
        try:
            p = fspath(path)
        except TypeError:
            return True  # a file descriptor
        if isinstance(p, bytes):
            p = p.decode("utf-8", "surrogateescape")
        full = realpath(p if isabs(p) else join(cwd, p))
        return any(full == r or full.startswith(r.rstrip("/") + "/") for r in roots)

    # Raised as the errors the standard library already expects (namedtuple and enum call sys._getframe in a
    # try/except ValueError), so ordinary programs keep working.
    introspection = {"sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
                     "gc.get_referents"}
    frame_attributes = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}
    path_events = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "os.utime", "shutil.rmtree"}
    listing_events = {"os.listdir", "os.scandir"}
    spawn_events = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.startfile"}
    net_events = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto"}

    def _hook(event, args) -> None:
        if event == "sys._getframe":
            raise ValueError("sandbox: call stack is not deep enough")
        if event == "object.__getattr__" and len(args) > 1 and args[1] in frame_attributes:
            raise AttributeError(f"sandbox: {args[1]} is not available")
        if event in introspection:
            raise deny(f"sandbox: {event} is not allowed")
        if event == "import" and args and args[0] in ("ctypes", "_ctypes"):
            raise ImportError("sandbox: ctypes is not allowed")
        if "net" in guards and event in net_events:
            raise deny(f"sandbox: no network ({event})")
        if "fs" in guards or "net" in guards:
            if event in spawn_events:
                raise deny(f"sandbox: cannot start programs ({event})")
        if "fs" in guards:
            if event == "open" and args and not _under(args[0], readable if _reads_only(args) else (cwd,)):
                raise deny(f"sandbox: {args[0]!r} is outside the working directory")
            if event in listing_events and args and not _under(args[0] if args[0] is not None else ".", readable):
                raise deny(f"sandbox: {args[0]!r} is outside the working directory")
            if event in path_events and args and not _under(args[0], (cwd,)):
                raise deny(f"sandbox: {args[0]!r} is outside the working directory")

    def _reads_only(args) -> bool:
        mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
        flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
        return not any(c in mode for c in "wax+") and not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)

    sys.addaudithook(_hook)
    # Everything the runner needs after the program ran is bound here, before it runs: a program that patches
    # builtins or `os` (exec, len, os.write, ...) cannot change how its tests are run or how the verdict is written.
    _exec, _write, _waitpid, _kill, _exit, _WNOHANG = exec, os.write, os.waitpid, os.kill, os._exit, os.WNOHANG
    _BaseException, _ChildProcessError, _OSError, _type = BaseException, ChildProcessError, OSError, type
    _flush_streams = _flusher(sys)
    tests = []
    for i, source in enumerate(_split_tests(job["tests"])):
        try:
            tests.append((i, compile(source, f"test_{i}.py", "exec")))
        except (SyntaxError, ValueError):
            tests.append((i, None))  # a test that does not compile fails
    total = len(tests)
    scope = {"__name__": "solution", "__builtins__": __builtins__}  # `if __name__ == "__main__":` blocks don't run
    passed = 0
    try:
        solution = compile(job["code"], "solution.py", "exec")
        del job
        _exec(solution, scope)
        loaded = True
    except _BaseException as exc:  # noqa: BLE001 - a program that fails to load passes no test
        _report(_write, f"solution: {_type(exc).__name__}: {exc}")
        loaded = False
    if loaded:
        for i, test in tests:
            if test is None:
                continue
            try:
                _exec(test, scope)
                passed += 1
            except _BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the test too
                _report(_write, f"test {i}: {_type(exc).__name__}: {exc}")
    _flush_streams()
    leftover = 0
    if in_pidns:  # PID 1 of its own namespace: any other process still alive was left running by the program
        try:
            while _waitpid(-1, _WNOHANG)[0]:
                pass
        except _ChildProcessError:
            pass
        try:
            _kill(-1, 0)
            leftover = 1
        except _OSError:
            pass
    _write(verdict_fd, f"\n{nonce} {passed} {total} {leftover}\n".encode())
    _exit(0)


def _flusher(sys_module):
    def flush() -> None:
        for stream in (sys_module.stdout, sys_module.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - the program may have closed or replaced its streams
                pass

    return flush


def _report(write, message: str) -> None:
    try:
        write(2, ("\n" + message[:500] + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def _split_tests(tests) -> list:
    """A list of tests stays a list; a string is split into its top-level statements, each assert one test
    (other statements, e.g. imports and helpers, are prepended to the next assert)."""
    if isinstance(tests, list):
        return [str(t) for t in tests]
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return [tests]
    lines = tests.splitlines(keepends=True)
    out, setup = [], []
    for node in tree.body:
        src = "".join(lines[node.lineno - 1 : node.end_lineno])
        src = _dedent_first(src, node.col_offset)
        if isinstance(node, ast.Assert):
            out.append("".join(setup) + src)
            setup = []
        else:
            setup.append(src)
    if setup:
        out.append("".join(setup))
    return out


def _dedent_first(src: str, col: int) -> str:
    return src[col:] if col else src


_main()
