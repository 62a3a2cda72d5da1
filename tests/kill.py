"""SIGKILL a command at a random moment of its work, for the tests that check a killed run leaves nothing half
written and resumes to the straight result."""

import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence


def kill_at_random_moment(
    command: Sequence[str],
    *,
    started: Callable[[], bool],
    seconds: float,
    rng: random.Random,
    env: dict | None = None,
    cwd=None,
    timeout: float = 300,
) -> tuple[int, str]:
    """Runs `command`, waits until `started()` is true (its work has begun), sleeps a random time in
    [0, `seconds`] and sends SIGKILL (no handler runs). Returns (exit status, stderr): -SIGKILL, or 0 when the
    command finished first."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not started() and process.poll() is None:
            assert time.monotonic() < deadline, f"{command[:3]} never started its work"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, seconds))
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        stderr = process.stderr.read().decode()
        process.stderr.close()
    return process.returncode, stderr
