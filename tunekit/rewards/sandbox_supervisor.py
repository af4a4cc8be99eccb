"""The sandbox's supervisor process: confine one untrusted Python program, run it, kill everything it started.

Run as `python -I -S sandbox_supervisor.py` with a JSON job on stdin (written by tunekit/rewards/sandbox.py);
prints one JSON line. It is a standalone stdlib-only script (no tunekit import) so it starts in tens of
milliseconds; it is single-threaded, so forking here is safe, unlike in the multi-threaded training process.

Layers (each one is reported in the result's `layers`; docs/rewards.md says what each guarantees):
- namespaces (root): unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC) before forking the program, so it has
  only a loopback-less network namespace and is PID 1 of its own PID namespace: when it dies or is killed, the
  kernel kills every process it started.
- credentials (root): the program runs as a dedicated uid/gid with no supplementary groups, so RLIMIT_NPROC binds
  and it cannot touch root's files; after the run every process of that uid is SIGKILLed (kill(-1) as that uid).
- rlimits: CPU seconds, address space, file size, processes, open files, no core dumps.
- Landlock (kernel >= 5.13): file access only to the interpreter, its standard library and system library
  directories (read/execute) and the working directory (read/write); TCP bind/connect denied (ABI >= 4); signals
  and abstract unix sockets scoped to the sandbox (ABI >= 6).
- seccomp (x86_64, aarch64): a filter that makes socket(AF_UNIX, ...) fail with EACCES and io_uring_setup with
  ENOSYS, so the program cannot connect to a UNIX socket on the host's file system (Landlock does not govern
  connect() on a socket file, and world-writable sockets of other services exist); a program of another
  architecture (a 32-bit binary) gets ENOSYS for every system call.
- process group: the program is a session leader; on the wall-clock deadline its whole group is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_ALL_V1 = (1 << 13) - 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2

# seccomp (include/uapi/linux/seccomp.h, filter.h, audit.h): a classic-BPF filter over struct seccomp_data
# {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}.
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x54, 0x06
X32_SYSCALL_BIT = 0x40000000
AF_UNIX = 1
SYS_IO_URING_SETUP = 425  # the same number on x86_64 and aarch64
# machine -> (AUDIT_ARCH_*, socket's syscall number)
SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_supported() -> bool:
    return sys.platform.startswith("linux") and os.uname().machine in SECCOMP_ARCHES


def _deny_unix_sockets() -> None:
    """Install the seccomp filter described in the module docstring on this process (inherited across exec).
    Needs no_new_privs (set before)."""
    arch, sys_socket = SECCOMP_ARCHES[os.uname().machine]
    program = [
        (BPF_LD_W_ABS, 0, 0, 4),  # 0: arch
        (BPF_JEQ_K, 0, 8, arch),  # 1: another architecture -> 10
        (BPF_LD_W_ABS, 0, 0, 0),  # 2: nr
        (BPF_AND_K, 0, 0, ~X32_SYSCALL_BIT & 0xFFFFFFFF),  # 3: x32 calls are the same calls
        (BPF_JEQ_K, 3, 0, SYS_IO_URING_SETUP),  # 4: io_uring (it can open sockets itself) -> 8
        (BPF_JEQ_K, 0, 3, sys_socket),  # 5: not socket() -> 9
        (BPF_LD_W_ABS, 0, 0, 16),  # 6: args[0] (domain), low 32 bits (little-endian)
        (BPF_JEQ_K, 0, 1, AF_UNIX),  # 7: AF_UNIX -> 8, else -> 9
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EACCES),  # 8
        (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 9
        (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),  # 10
    ]
    filters = (_SockFilter * len(program))(*[_SockFilter(*ins) for ins in program])
    prog = _SockFprog(len(program), filters)
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


# Bytes of the program's stdout/stderr kept: the head and the tail (where the runner's verdict is); the middle
# is read and dropped, so a program printing without end costs no memory.
HEAD_CAP = 64 * 1024
TAIL_CAP = 64 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _landlock_abi() -> int:
    abi = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return int(abi) if abi > 0 else 0


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock_ruleset(abi: int, read_paths: list[str], write_paths: list[str], device_files: list[str]) -> int:
    """Build a ruleset fd: read/execute under `read_paths`, everything under `write_paths`, nothing else."""
    fs = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    attr = _RulesetAttr(fs, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                        (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    file_rights = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    rules = [(p, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR) for p in read_paths]
    rules += [(p, fs) for p in write_paths]
    rules += [(p, FS_READ_FILE | FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0)) for p in device_files]
    for path, access in rules:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            access &= file_rights
        rule = _PathBeneathAttr(access, pfd)
        rc = _libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                           ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(pfd)
        if rc != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
    return int(fd)


def _set_limits(limits: dict) -> None:
    cpu = int(limits["cpu_seconds"])
    pairs = {
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_AS: (int(limits["memory_bytes"]),) * 2,
        resource.RLIMIT_FSIZE: (int(limits["file_size_bytes"]),) * 2,
        resource.RLIMIT_NPROC: (int(limits["processes"]),) * 2,
        resource.RLIMIT_NOFILE: (int(limits["open_files"]),) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in pairs.items():
        resource.setrlimit(which, value)


def _child(job: dict, ruleset_fd: int, stdout_w: int, stdin_r: int) -> None:
    """In the forked child: drop to the sandbox credentials, confine, exec the interpreter. Never returns.
    A failure here is the sandbox's, not the program's: it is written to the output as `sandbox setup: ...`."""
    step = "fds"
    try:
        os.read(stdin_r, 1)  # wait until the supervisor has put this process into its cgroups
        os.setsid()
        os.dup2(stdin_r, 0)
        os.dup2(stdout_w, 1)
        os.dup2(stdout_w, 2)
        keep = -1
        if ruleset_fd >= 0:
            keep = os.dup2(ruleset_fd, 3, inheritable=False) if ruleset_fd != 3 else 3
        os.closerange(4 if keep >= 0 else 3, 65536)
        step = "chdir"
        os.chdir(job["workdir"])
        step = "rlimits"
        _set_limits(job["limits"])
        if job["drop_privileges"]:
            step = "credentials"
            os.setgroups([])
            os.setgid(job["gid"])
            os.setuid(job["uid"])
        step = "no_new_privs"
        # Die with the supervisor (set after setuid, which clears it; kept across exec of a non-setuid binary).
        if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if job.get("seccomp", True) and seccomp_supported():
            step = "seccomp"
            _deny_unix_sockets()
        if keep >= 0:
            step = "landlock"
            if _libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(keep), ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self")
            os.close(keep)
        step = "exec"
        interpreter = job["interpreter"]
        os.execve(interpreter, [interpreter, "-I", "-S", "-B", "-c", job["runner"]], job["env"])
    except BaseException as exc:  # noqa: BLE001 - whatever happens here, the child must not return into the supervisor
        try:
            os.write(1, f"\nsandbox setup: {step}: {type(exc).__name__}: {exc}\n".encode())
        finally:
            os._exit(127)


def _processes_of(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as f:
                zombie = False
                for line in f:
                    if line.startswith("State:"):
                        zombie = line.split()[1] in ("Z", "X")  # already dead, waiting for its parent
                    elif line.startswith("Uid:"):
                        if int(line.split()[1]) == uid and not zombie:
                            pids.append(int(name))
                        break
        except (OSError, ValueError):
            continue
    return pids


def _sweep_uid(uid: int) -> bool:
    """SIGKILL every process whose real uid is the sandbox's (found in /proc); True when any was found.

    (No fork here: after the PID namespace's init died, this process can no longer fork.)"""
    found = False
    for _ in range(50):
        pids = _processes_of(uid)
        if not pids:
            break
        found = True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    return found


CGROUP_ROOT = "/sys/fs/cgroup"


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for a v1 controller, or its v2 path (controller None)."""
    with open("/proc/self/cgroup", encoding="ascii") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            names = controllers.split(",") if controllers else []
            if (controller is None and not names) or (controller is not None and controller in names):
                return path
    return None


def _write(folder: str, name: str, value: str) -> None:
    with open(os.path.join(folder, name), "w", encoding="ascii") as f:
        f.write(value)


def cgroup_folders(name: str) -> tuple[list[tuple[str, list[tuple[str, str]]]], str]:
    """Where the cgroups of run `name` live: [(folder, [(file, limit key)])], and "v1"/"v2"."""
    if os.path.isfile(f"{CGROUP_ROOT}/cgroup.controllers"):
        folder = f"{CGROUP_ROOT}{_own_cgroup(None) or '/'}".rstrip("/") + f"/{name}"
        return [(folder, [("memory.max", "memory"), ("pids.max", "pids"), ("memory.swap.max", "zero")])], "v2"
    settings = {"memory": [("memory.limit_in_bytes", "memory"), ("memory.memsw.limit_in_bytes", "memory")],
                "pids": [("pids.max", "pids")]}
    out = []
    for controller, files in settings.items():
        own = _own_cgroup(controller)
        if own is not None and os.path.isdir(f"{CGROUP_ROOT}/{controller}"):
            out.append((f"{CGROUP_ROOT}/{controller}{own}".rstrip("/") + f"/{name}", files))
    return out, "v1"


def _make_cgroups(name: str, limits: dict) -> tuple[list[str], str]:
    """Cgroups bounding the whole process tree: memory (no swap) and process count. ([folders], "v1"/"v2"), or
    ([], "") where cgroups are not writable (then only the per-process rlimits bound memory)."""
    values = {"memory": str(int(limits["memory_bytes"])), "pids": str(int(limits["processes"])), "zero": "0"}
    made: list[str] = []
    try:
        folders, version = cgroup_folders(name)
        for folder, files in folders:
            os.mkdir(folder)
            made.append(folder)
            _CLEANUP.append(folder)
            for file, key in files:
                required = file in ("memory.max", "pids.max", "memory.limit_in_bytes", "pids.max")
                if required or os.path.isfile(os.path.join(folder, file)):
                    _write(folder, file, values[key])
        return made, (version if made else "")
    except (OSError, ValueError):
        _remove_cgroups(made)
        return [], ""


_CLEANUP: list[str] = []


def _memory_limit_hit(folders: list[str]) -> bool:
    for folder in folders:
        for file, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            try:
                with open(os.path.join(folder, file), encoding="ascii") as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) == 2 and parts[0] == key and int(parts[1]) > 0:
                            return True
            except (OSError, ValueError):
                continue
        try:
            with open(os.path.join(folder, "memory.failcnt"), encoding="ascii") as f:
                if int(f.read().strip() or 0) > 0:
                    return True
        except (OSError, ValueError):
            pass
    return False


def _remove_cgroups(folders: list[str]) -> None:
    """SIGKILL whatever is still in each cgroup, then remove it."""
    for folder in folders:
        for _ in range(200):
            try:
                with open(os.path.join(folder, "cgroup.procs"), encoding="ascii") as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.rmdir(folder)
                break
            except OSError:
                time.sleep(0.01)


def main() -> None:
    job = json.load(sys.stdin)
    layers: list[str] = []
    is_root = os.geteuid() == 0
    job["drop_privileges"] = bool(is_root)
    if job.get("namespaces", True):
        flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
        if not is_root:
            flags |= CLONE_NEWUSER
        if _libc.unshare(flags) == 0:
            layers += ["netns", "pidns"] + (["userns"] if not is_root else [])
    if is_root:
        layers.append(f"uid:{job['uid']}")
    cgroups, cgroup_version = _make_cgroups(f"tunekit-sandbox-{os.getpid()}", job["limits"]) if (
        is_root and job.get("cgroups", True)) else ([], "")
    if cgroups:
        layers.append(f"cgroup:{cgroup_version}")
    layers.append("rlimits")
    if job.get("seccomp", True) and seccomp_supported():
        layers.append("seccomp:no-unix-sockets")
    ruleset_fd = -1
    abi = _landlock_abi() if job.get("landlock", True) else 0
    if abi:
        try:
            ruleset_fd = _landlock_ruleset(abi, job["read_paths"], [job["workdir"]], ["/dev/null"])
            layers.append(f"landlock:v{abi}")
        except OSError:
            ruleset_fd = -1
    hook = []
    if "netns" not in layers and not (abi >= 4 and ruleset_fd >= 0):
        hook.append("net")
    if ruleset_fd < 0:
        hook.append("fs")
    job["env"]["TUNEKIT_SANDBOX_GUARDS"] = ",".join(hook)
    job["env"]["TUNEKIT_SANDBOX_PIDNS"] = "1" if "pidns" in layers else "0"
    if hook:
        layers.append("audit-hook:" + "+".join(hook))

    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(in_w)
        _child(job, ruleset_fd, out_w, in_r)
    os.close(out_w)
    os.close(in_r)
    for folder in cgroups:  # the child waits for this byte: it is in its cgroups before it runs anything
        try:
            _write(folder, "cgroup.procs", str(pid))
        except OSError:
            pass
    os.write(in_w, b"g")
    os.close(in_w)
    if ruleset_fd >= 0:
        os.close(ruleset_fd)

    deadline = start + float(job["timeout"])
    head = bytearray()
    tail = bytearray()
    dropped = 0
    timed_out = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select([out_r], [], [], left)
        if not ready:
            continue
        data = os.read(out_r, 65536)
        if not data:
            break
        room = HEAD_CAP - len(head)
        if room > 0:
            head += data[:room]
            data = data[room:]
        tail += data
        if len(tail) > TAIL_CAP:
            dropped += len(tail) - TAIL_CAP
            del tail[: len(tail) - TAIL_CAP]
    status = None
    if not timed_out:
        # The output closed: the program exited (or closed its output); give it until the deadline to finish.
        while True:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.005)
    # Kill its process group, and PID 1 of the namespace (the kernel then kills every process in it).
    targets = [lambda: os.killpg(pid, signal.SIGKILL)]
    if status is None:
        targets.append(lambda: os.kill(pid, signal.SIGKILL))
    for target in targets:
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    if status is None:
        _, status = os.waitpid(pid, 0)
    os.close(out_r)
    leftover = _sweep_uid(job["uid"]) if is_root else False
    memory_limit_hit = _memory_limit_hit(cgroups)
    _remove_cgroups(cgroups)
    elapsed = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    json.dump(
        {
            "exit_code": code,
            "timed_out": timed_out,
            "elapsed": round(elapsed, 4),
            "output": (bytes(head) + (b"\n[... %d bytes dropped ...]\n" % dropped if dropped else b"")
                       + bytes(tail)).decode("utf-8", "replace"),
            "layers": layers,
            "leftover_processes": leftover,
            "memory_limit_hit": memory_limit_hit,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            sys.exit(1)
        raise
    finally:
        _remove_cgroups(_CLEANUP)
