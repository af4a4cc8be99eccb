"""The code sandbox against hostile programs. Every hostile program runs ONLY through the sandbox.

Each hostile program's tests assert that its attack worked, so a score of 0 means the attack failed (not merely
that the program crashed), and the test also checks the damage on disk / on the network / in the process table.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tunekit.rewards import get_reward
from tunekit.rewards.sandbox import UID_BASE, UIDS_PER_PROCESS, Sandbox, SandboxLimits

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

TIMEOUT = 2.0
SLACK = 4.0  # process start-up on a loaded 2-core machine


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(timeout=TIMEOUT, memory_mb=512, processes=16), workers=2)


def sandbox_processes() -> list[int]:
    """Processes whose real uid is one of this test process's sandbox uids."""
    low = UID_BASE + (os.getpid() % 30_000) * UIDS_PER_PROCESS
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                for line in Path(f"/proc/{name}/status").read_text().splitlines():
                    if line.startswith("Uid:"):
                        if low <= int(line.split()[1]) < low + UIDS_PER_PROCESS:
                            found.append(int(name))
                        break
            except (OSError, ValueError):
                pass
    return found


def run_timed(sandbox: Sandbox, code: str, tests):
    start = time.monotonic()
    result = sandbox.run(code, tests)
    wall = time.monotonic() - start
    assert wall < TIMEOUT + SLACK, f"took {wall:.1f}s"
    return result


def test_good_program_scores_and_layers(sandbox):
    add = "def add(a, b):\n    return a + b\n"
    result = run_timed(sandbox, add, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
    assert result.score() == 1.0 and (result.passed, result.total) == (2, 2)
    if os.geteuid() == 0:
        assert {"netns", "pidns", "rlimits"} <= set(result.layers), result.layers
        assert any(layer.startswith("uid:") for layer in result.layers)
    # a tests string: each top-level assert is one test; other statements are setup
    half = run_timed(sandbox, "def add(a, b):\n    return a + b\n",
                     "import math\nassert add(1, 2) == 3\nassert add(2, 2) == 5\n")
    assert (half.passed, half.total) == (1, 2) and half.score() == 0.0 and half.score(partial=True) == 0.5
    # ordinary standard-library code still works under the guards (namedtuple/enum call sys._getframe)
    stdlib = run_timed(sandbox, "import collections, enum, dataclasses, typing, re, json, fractions\n"
                       "P = collections.namedtuple('P', 'x y')\nclass E(enum.Enum):\n    A = 1\n"
                       "@dataclasses.dataclass\nclass D:\n    a: int = 1\n", ["assert P(1, 2).y + D().a == 3"])
    assert stdlib.score() == 1.0, stdlib.output
    # megabytes of output: kept bounded (head + tail), the verdict at the end still read
    chatty = run_timed(sandbox, "for i in range(200000):\n    print('spam', i)\n", ["assert i == 199999"])
    assert chatty.score() == 1.0 and len(chatty.output) <= 4000


def test_infinite_loop_is_killed(sandbox):
    result = run_timed(sandbox, "while True:\n    pass\n", ["assert True"])
    assert result.timed_out and result.score() == 0.0


def test_huge_allocation_fails(sandbox):
    result = run_timed(sandbox, "x = bytearray(10 * 1024 ** 3)\n", ["assert len(x) == 10 * 1024 ** 3"])
    assert result.score() == 0.0 and "MemoryError" in result.output


def test_memory_of_the_whole_tree_is_bounded():
    # 4 processes x 120 MB: each is under the per-process address-space limit (200 MB), the tree (480 MB) is not.
    sb = Sandbox(SandboxLimits(timeout=10, memory_mb=200, processes=16))
    code = (
        "import os\n"
        "pids = []\n"
        "for _ in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(120 * 1024 * 1024)\n"
        "        for i in range(0, len(block), 4096):\n            block[i] = 1\n"
        "        os._exit(0)\n"
        "    pids.append(pid)\n"
        "codes = [os.waitpid(p, 0)[1] for p in pids]\n"
    )
    result = sb.run(code, ["assert codes == [0, 0, 0, 0]"])
    if not any(layer.startswith("cgroup") for layer in result.layers):
        pytest.skip("no writable cgroups here: memory is bounded per process only")
    assert result.score() == 0.0 and result.memory_limit_hit, result
    assert not result.timed_out  # the kernel's OOM killer acted inside the cgroup, the program went on
    assert sandbox_processes() == []


def test_fork_bomb_is_bounded_and_reaped(sandbox):
    # Every child forks forever too; the parent counts how many forks it got before RLIMIT_NPROC said no.
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(1000):\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n"
        "        while True:\n"
        "            try:\n                os.fork()\n            except OSError:\n                time.sleep(0.01)\n"
        "    n += 1\n"
        "print('forked', n)\n"
    )
    result = run_timed(sandbox, code, ["assert n == 1000"])
    assert result.score() == 0.0 and result.passed == 0
    forked = int(result.output.split("forked")[1].split()[0])
    assert forked < sandbox.limits.processes  # bounded by RLIMIT_NPROC (16), not 1000
    assert sandbox_processes() == []


def test_writes_and_deletes_outside_are_refused(sandbox):
    # World-writable folder and file: only the sandbox (not file permissions) protects them.
    folder = Path(tempfile.mkdtemp(prefix="tunekit-sentinel-"))
    folder.chmod(0o777)
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("keep me")
    sentinel.chmod(0o666)
    code = (
        "import os, shutil\n"
        f"S = {str(sentinel)!r}\nD = {str(folder)!r}\n"
        "for attack in (lambda: os.remove(S), lambda: open(S, 'w').write('gone'),\n"
        "               lambda: open(os.path.join(D, 'new.txt'), 'w').write('x'), lambda: shutil.rmtree(D)):\n"
        "    try:\n        attack()\n    except OSError:\n        pass\n"
    )
    try:
        result = run_timed(sandbox, code, ["assert not os.path.exists(S) or open(S).read() != 'keep me' "
                                           "or os.path.exists(os.path.join(D, 'new.txt'))"])
        assert result.score() == 0.0
        assert sentinel.read_text() == "keep me"
        assert sorted(p.name for p in folder.iterdir()) == ["sentinel.txt"]
    finally:
        sentinel.unlink(missing_ok=True)
        folder.rmdir()


def test_reading_outside_is_refused(sandbox):
    folder = Path(tempfile.mkdtemp(prefix="tunekit-secret-"))
    folder.chmod(0o755)
    secret = folder / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)  # world-readable: only the sandbox keeps it private
    try:
        for path in (secret, Path("/etc/passwd")):
            result = run_timed(sandbox, f"data = open({str(path)!r}).read()\n", ["assert len(data) > 0"])
            assert result.score() == 0.0
            assert "PermissionError" in result.output
    finally:
        secret.unlink()
        folder.rmdir()


def test_network_is_unreachable(sandbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    code = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'leak')\n"
    )
    try:
        result = run_timed(sandbox, code, ["assert s is not None"])
        assert result.score() == 0.0
        # A connection would sit in the listen backlog (the kernel completes the handshake without accept()).
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_process_left_running_is_killed(sandbox):
    # The program passes its test but leaves a detached child behind: it scores 0 and the child is killed.
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    while True:\n        time.sleep(0.05)\n"
        "def f():\n    return 1\n"
    )
    result = run_timed(sandbox, code, ["assert f() == 1"])
    assert result.score() == 0.0 and result.passed == 1 and result.leftover_processes
    # ... and one that hangs with a child: the whole group is killed at the deadline
    hanging = run_timed(sandbox, "import subprocess, sys\n"
                        "subprocess.Popen([sys.executable, '-c', 'while True: pass'])\nwhile True:\n    pass\n",
                        ["assert True"])
    assert hanging.timed_out and hanging.score() == 0.0
    assert sandbox_processes() == []


def test_reward_hacks_score_zero(sandbox):
    # Exiting "successfully" before the tests run leaves no nonce-signed verdict.
    early = run_timed(sandbox, "import os\nprint('0 1 1 0')\nos._exit(0)\n", ["assert False"])
    assert early.score() == 0.0 and not early.verdict
    # Walking up the frames to the runner (where the nonce lives) is refused.
    frames = run_timed(sandbox, "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n"
                       "    runner = e.__traceback__.tb_frame.f_back\n", ["assert runner is not None"])
    assert frames.score() == 0.0 and "tb_frame is not available" in frames.output
    # Patching what the runner uses after the program (exec, len, os.write) changes nothing.
    for patch in ("import builtins\nbuiltins.exec = lambda *a, **k: None\n",
                  "import builtins\nbuiltins.len = lambda x: 1\n",
                  "import os\nreal_write = os.write\n"
                  "os.write = lambda fd, data: real_write(fd, data.replace(b' 0 2 ', b' 2 2 '))\n"):
        patched = run_timed(sandbox, patch, ["assert False", "assert 1 == 2"])
        assert (patched.passed, patched.total) == (0, 2) and patched.score(partial=True) == 0.0, patch
    # A test that does not compile fails alone.
    broken = run_timed(sandbox, "x = 1\n", ["assert x == 1", "assert x ==", "assert x > 0"])
    assert (broken.passed, broken.total) == (2, 3)


def test_audit_hook_fallback_without_kernel_layers():
    """Where namespaces and Landlock are unavailable, the in-process audit hook still refuses network and
    outside files (a weaker guard: see docs/rewards.md)."""
    sb = Sandbox(SandboxLimits(timeout=TIMEOUT), namespaces=False, landlock=False)
    result = run_timed(sb, "import socket\ns = socket.socket()\n", ["assert s"])
    assert result.score() == 0.0 and "no network" in result.output
    assert "audit-hook:net+fs" in result.layers
    read = run_timed(sb, "data = open('/etc/hostname').read()\n", ["assert data"])
    assert read.score() == 0.0 and "outside the working directory" in read.output
    inside = run_timed(sb, "open('mine.txt', 'w').write('ok')\ndata = open('mine.txt').read()\n",
                       ["assert data == 'ok'"])
    assert inside.score() == 1.0, inside.output


def test_code_tests_reward_parallel():
    fn = get_reward("code_tests", timeout=TIMEOUT, workers=2, partial=True)
    completions = [
        "Here you go:\n```python\ndef sq(x):\n    return x * x\n```",
        "```python\ndef sq(x):\n    return x + x\n```",  # passes sq(2) == 4 only
        "```python\nwhile True: pass\n```",
        "no tests for this one",
    ]
    tests = [["assert sq(2) == 4", "assert sq(3) == 9"]] * 3 + [None]
    start = time.monotonic()
    out = fn(prompts=["p"] * 4, completions=completions, completion_ids=None, tests=tests, trainer_state=None)
    assert out == [1.0, 0.5, 0.0, None]
    assert time.monotonic() - start < TIMEOUT + 2 * SLACK


def test_a_broken_sandbox_is_an_error_not_a_zero():
    """When the sandbox itself cannot start Python, every completion would score 0: it is an error instead."""
    from tunekit.errors import TunekitError

    sb = Sandbox(SandboxLimits(timeout=TIMEOUT))
    sb.read_paths = []  # Landlock then forbids executing the interpreter
    if os.geteuid() != 0 and not any(layer.startswith("landlock") for layer in sb.run("x = 1", ["pass"]).layers):
        pytest.skip("needs Landlock")
    with pytest.raises(TunekitError, match="the sandbox itself failed \\(sandbox setup: exec: "
                                           "PermissionError"):
        sb.run("x = 1", ["assert x == 1"])


NON_ROOT_SCRIPT = """
import importlib.util, json, sys, types
root = sys.argv[1]
for name, path in (("tunekit", "/tunekit"), ("tunekit.rewards", "/tunekit/rewards")):
    package = types.ModuleType(name)
    package.__path__ = [root + path]
    sys.modules[name] = package
spec = importlib.util.spec_from_file_location("tunekit.rewards.sandbox", root + "/tunekit/rewards/sandbox.py")
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
sb = sandbox.Sandbox(sandbox.SandboxLimits(timeout=2, processes=64))
out = {}
for name, code, tests in [
    ("good", "def f():\\n    return 1\\n", ["assert f() == 1"]),
    ("loop", "while True:\\n    pass\\n", ["assert True"]),
    ("socket", "import socket\\ns = socket.create_connection(('127.0.0.1', 9), timeout=1)\\n", ["assert s"]),
    ("read", "data = open('/etc/passwd').read()\\n", ["assert data"]),
]:
    r = sb.run(code, tests)
    out[name] = [r.score(), r.timed_out, r.layers]
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK), reason="needs root to demote")
def test_sandbox_started_by_an_unprivileged_user():
    """The same sandbox started by user nobody (no root: a user namespace, no uid switch, no cgroups).
    Runs on the system python3 (nobody cannot enter this venv), which lacks tunekit's dependencies: the sandbox
    module is loaded by path, it needs only the standard library."""
    import json
    import shutil
    import subprocess

    folder = Path(tempfile.mkdtemp(prefix="tunekit-nonroot-"))  # /tmp/pytest-of-root is closed to nobody
    folder.chmod(0o755)
    script = folder / "non_root.py"
    script.write_text(NON_ROOT_SCRIPT)
    script.chmod(0o644)
    root = str(Path(__file__).resolve().parent.parent)

    def demote() -> None:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    try:
        proc = subprocess.run(["/usr/bin/python3", "-I", str(script), root], preexec_fn=demote, capture_output=True,
                              text=True, cwd="/tmp", env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"}, timeout=60)
    finally:
        shutil.rmtree(folder)
    if proc.returncode != 0 and "can't open file" in proc.stderr:
        pytest.skip(f"user nobody cannot read this checkout: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["good"][0] == 1.0
    assert out["loop"][:2] == [0.0, True]
    assert out["socket"][0] == 0.0 and out["read"][0] == 0.0
    assert not any(layer.startswith(("uid:", "cgroup")) for layer in out["good"][2])


def test_sandbox_uids_are_never_shared():
    """Two pools over the same uid block (two trainers whose pids collide) never hand out the same uid at once."""
    from tunekit.rewards.sandbox import _UidPool

    a, b = _UidPool(), _UidPool()
    held_a = [a.acquire() for _ in range(3)]
    held_b = [b.acquire() for _ in range(3)]
    assert not set(held_a) & set(held_b)
    a.release(held_a[0])
    assert b.acquire() == held_a[0]  # free again once released


def _listening_unix_socket() -> tuple[socket.socket, str]:
    """A world-writable UNIX socket on the host's file system, as other services leave them in /tmp or /run."""
    folder = tempfile.mkdtemp(prefix="tunekit-host-socket-", dir="/tmp")
    os.chmod(folder, 0o777)
    path = os.path.join(folder, "service.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(1)
    server.settimeout(0.5)
    return server, path


UNIX_CONNECT = ("import socket\n"
                "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                "s.connect({path!r})\n"
                "s.sendall(b'leaked')\n"
                "s.close()\n"
                "sent = True\n")


def _received(server: socket.socket) -> bytes:
    try:
        conn, _ = server.accept()
    except TimeoutError:
        return b""
    with conn:
        conn.settimeout(0.5)
        return conn.recv(64)


@pytest.mark.parametrize("seccomp", [True, False], ids=["sandbox", "without-seccomp"])
def test_host_unix_sockets_are_unreachable(seccomp):
    """The hostile program (only ever run inside the sandbox) connects to a host UNIX socket and sends data. With
    the seccomp layer it cannot even create the socket; without it (the control case) the attack succeeds, which
    shows the test can fail."""
    from tunekit.rewards.sandbox_supervisor import seccomp_supported

    if not seccomp_supported():
        pytest.skip("seccomp filter is built for x86_64 and aarch64 Linux")
    server, path = _listening_unix_socket()
    try:
        sb = Sandbox(SandboxLimits(timeout=TIMEOUT, memory_mb=512, processes=16), seccomp=seccomp)
        result = sb.run(UNIX_CONNECT.format(path=path), ["assert sent"])
        received = _received(server)
    finally:
        server.close()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    if seccomp:
        assert "seccomp:no-unix-sockets" in result.layers
        assert result.score() == 0.0 and received == b"", (result.output, received)
        assert "Permission denied" in result.output, result.output
    else:
        assert received == b"leaked" and result.score() == 1.0, (result.output, result.layers)


def test_python_still_works_under_the_seccomp_layer(sandbox):
    """Pipes, socketpair-free stdlib, subprocess-free code: the filter denies only AF_UNIX sockets and io_uring."""
    result = run_timed(sandbox, "import json, re, collections\nv = json.dumps({'a': [1, 2]})\n",
                       ["assert v == '{\"a\": [1, 2]}'"])
    assert result.score() == 1.0 and "seccomp:no-unix-sockets" in result.layers, result.output
