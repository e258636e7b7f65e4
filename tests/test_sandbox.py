"""The code sandbox against programs that misbehave: each case is a real program in a real process."""
import os
import socket
import time

import pytest

from raychat.eval.sandbox import FILE_SIZE_LIMIT, OUTPUT_LIMIT, execute, network_isolated, runs_as_nobody


def test_a_correct_program_succeeds_with_its_output():
    result = execute("import math\nprint(math.factorial(5))\nassert sum([1, 2]) == 3\n")
    assert result.success and result.returncode == 0 and result.stdout == "120\n" and not result.timed_out


def test_a_failing_assertion_is_a_failure_with_its_traceback():
    result = execute("def add(a, b):\n    return a - b\n\nassert add(2, 2) == 4\n")
    assert not result.success and result.returncode == 1 and "AssertionError" in result.stderr


def test_an_endless_loop_is_killed_at_the_deadline_with_its_children():
    marker = f"raychat-sandbox-{os.getpid()}-{time.time_ns()}"
    escape = network_isolated()   # in a PID namespace even a child in its own session dies with the program
    program = ("import subprocess, time\n"
               f"subprocess.Popen(['sleep', '300', '{marker}'])\n"   # children that would outlive the program
               f"subprocess.Popen(['sleep', '301', '{marker}'], start_new_session={escape})\n"
               "while True:\n    pass\n")
    t0 = time.monotonic()
    result = execute(program, timeout_s=1.0)
    assert result.timed_out and not result.success and time.monotonic() - t0 < 5
    time.sleep(0.2)
    lingering = [p for p in os.listdir("/proc") if p.isdigit() and marker in _cmdline(p)]
    assert lingering == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def test_memory_beyond_the_limit_fails_without_hurting_the_evaluator():
    result = execute("block = bytearray(512 * 2**20)\nprint(len(block))\n", memory_mb=128)
    assert not result.success and "MemoryError" in result.stderr


def test_output_floods_and_big_files_are_capped():
    result = execute("import sys\nsys.stdout.write('x' * (4 * 2**20))\n")
    assert len(result.stdout) <= OUTPUT_LIMIT + 100 and result.stdout.endswith("[output truncated]")
    big = execute(f"open('big.bin', 'wb').write(b'0' * {2 * FILE_SIZE_LIMIT})\n")
    assert not big.success   # SIGXFSZ / EFBIG beyond the file-size limit


def test_no_parent_environment_no_stdin_and_a_private_working_directory(monkeypatch):
    monkeypatch.setenv("RAYCHAT_SECRET_TOKEN", "hunter2")
    program = ("import os, sys\n"
               "print('RAYCHAT_SECRET_TOKEN' in os.environ)\n"
               "print(os.getcwd())\n"
               "try:\n    input()\nexcept EOFError:\n    print('stdin closed')\n")
    result = execute(program)
    secret, cwd, stdin = result.stdout.splitlines()
    assert secret == "False" and stdin == "stdin closed" and os.path.basename(cwd).startswith("raychat_sandbox_")
    assert not os.path.exists(cwd)   # deleted afterwards


def test_the_evaluator_survives_a_program_that_attacks_it(tmp_path):
    """It tries to kill its parent and every process it can name, and to delete a file of the evaluator."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    program = ("import os, signal\n"
               f"evaluator = {os.getpid()}\n"
               "for pid in (os.getppid(), evaluator):\n"
               "    try:\n        os.kill(pid, signal.SIGKILL) if pid > 1 else None\n"
               "    except OSError as error:\n        print(type(error).__name__)\n"
               f"try:\n    os.remove({str(precious)!r})\nexcept OSError as error:\n    print(type(error).__name__)\n"
               "raise SystemExit(3)\n")
    result = execute(program)
    assert result.returncode == 3 and not result.success   # and this process is still here to check it
    if network_isolated():   # the evaluator's pid does not exist in the program's PID namespace
        assert result.stdout.startswith("ProcessLookupError")
    if runs_as_nobody():
        assert precious.read_text() == "keep me" and result.stdout.rstrip().endswith("PermissionError")


@pytest.mark.skipif(not network_isolated(), reason="no network namespace on this machine (see the module docstring)")
def test_no_network_not_even_the_evaluators_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))\n"
                   "print('connected')\n")
        result = execute(program)
    assert not result.success and "connected" not in result.stdout and "OSError" in result.stderr or "Error" in result.stderr


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout_s"):
        execute("print(1)", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        execute("print(1)", memory_mb=1)
