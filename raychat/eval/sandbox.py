"""Run model-written Python (HumanEval completions with their tests) in a throw-away process.

`execute(program, timeout_s=5.0, memory_mb=256) -> ExecResult(success, returncode, stdout, stderr,
timed_out)`. Every program gets:

- a fresh interpreter (`python -I -S`: no site-packages, no PYTHON* variables, no current directory on
  sys.path) in a new temporary working directory that is deleted afterwards;
- an environment without the parent's variables (no keys, tokens or paths leak in) and stdin closed;
- its own session and process group, killed whole at the wall-clock timeout and after every run;
- limits (setrlimit, inherited by everything it starts): address space (`memory_mb`), CPU seconds, file
  size (stdout, stderr and any file it writes), open files, no core dumps, a process count;
- where the machine allows it (probed once, `_isolation()`): new network and PID namespaces
  (`unshare`): no network at all, not even the evaluator's loopback; the evaluator's processes are
  invisible, so they cannot be signalled; and when the first process of the namespace ends, the kernel
  kills everything left in it, including children that started their own session. As root, the program
  also runs as the unprivileged user nobody with no capabilities (`setpriv`), so it cannot write the
  evaluator's files or lift its limits.

What it does not isolate: it is not a container. The program sees the host's filesystem (as nobody:
world-readable files can be read, world-writable places like /tmp written; if the interpreter is not
runnable as nobody, it runs as root inside the namespaces and can write anything root can), and shares
CPU, memory bandwidth and the kernel with the evaluator. Without unshare, the network and the evaluator's
processes are reachable, a child that starts its own session survives the group kill, and the process
limit counts every process of the user. It runs as PID 1 of its namespace, so signals it sends to itself
are ignored. Run untrusted code at scale in a VM or container as well.
"""
from __future__ import annotations

import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 64 * 1024          # bytes of stdout / stderr kept in the result
FILE_SIZE_LIMIT = 16 * 2**20      # no file the program writes (its output files included) grows beyond this
MAX_PROCESSES = 64                # processes and threads of the sandbox user
NOBODY = 65534


@dataclass
class ExecResult:
    success: bool         # exit status 0 within every limit
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


NAMESPACES = ["unshare", "--net", "--pid", "--fork", "--kill-child"]
DROP_TO_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                  "--bounding-set=-all", "--"]


@functools.cache
def _isolation() -> tuple[str, ...]:
    """The strongest command prefix that can run this interpreter here, probed once: new network and PID
    namespaces (nothing reachable; the evaluator's processes invisible, and the whole namespace dies with
    its first process) and, as root, the unprivileged user nobody; else as much of that as works."""
    root = os.geteuid() == 0
    candidates = ([NAMESPACES + DROP_TO_NOBODY, NAMESPACES] if root
                  else [["unshare", "--user", "--map-root-user", *NAMESPACES[1:]]]) + [[]]
    for prefix in candidates:
        try:
            probe = subprocess.run([*prefix, sys.executable, "-I", "-S", "-c", "pass"], timeout=20,
                                   stdin=subprocess.DEVNULL, capture_output=True)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return tuple(prefix)
    return ()


def network_isolated() -> bool:
    """Whether programs run in their own network namespace on this machine."""
    return "--net" in _isolation()


def runs_as_nobody() -> bool:
    return "setpriv" in _isolation()


def _limit_child(timeout_s: float, memory_mb: int) -> None:
    """Runs in the child between fork and exec: resource limits, inherited by everything it starts."""
    cpu = int(timeout_s) + 1
    for limit, value in ((resource.RLIMIT_AS, memory_mb * 2**20), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, MAX_PROCESSES)):
        resource.setrlimit(limit, (value, value))


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(path: Path) -> str:
    with open(path, "rb") as f:
        data = f.read(OUTPUT_LIMIT + 1)
    text = data[:OUTPUT_LIMIT].decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > OUTPUT_LIMIT else text


def execute(program: str, timeout_s: float = 5.0, memory_mb: int = 256) -> ExecResult:
    """Run `program` (Python source) under the limits above; never raises for anything the program does."""
    if not timeout_s > 0 or memory_mb < 16:
        raise ValueError(f"timeout_s must be > 0 and memory_mb >= 16, got {timeout_s} and {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="raychat_sandbox_") as tmp:
        workdir = Path(tmp)
        (workdir / "program.py").write_text(program, encoding="utf-8")
        out, err = workdir / "stdout", workdir / "stderr"
        out.touch()
        err.touch()
        if runs_as_nobody():   # the unprivileged user works in, and writes its output to, this directory
            for path in (workdir, out, err):
                os.chown(path, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
        timed_out = False
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            try:
                proc = subprocess.Popen(
                    [*_isolation(), sys.executable, "-I", "-S", "program.py"], cwd=workdir, env=env,
                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True, close_fds=True,
                    preexec_fn=functools.partial(_limit_child, timeout_s, memory_mb))
            except (OSError, subprocess.SubprocessError) as error:
                return ExecResult(False, None, "", f"sandbox: could not start the program: {error}", False)
            deadline = time.monotonic() + timeout_s
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)   # the timeout, or children left running after the program exited
            returncode = proc.wait()
        result = ExecResult(success=returncode == 0 and not timed_out, returncode=returncode,
                            stdout=_read_capped(out), stderr=_read_capped(err), timed_out=timed_out)
    return result
