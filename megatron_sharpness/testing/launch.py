"""Launch one Python process per rank on this host, the way torchrun would, but with a hard
timeout: a rank that dies or hangs fails the launch with every rank's output instead of leaving
the others blocked in a collective forever."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

# Once one rank has failed, the others get this long to finish before they are killed.
FAILURE_GRACE_SECONDS = 10.0


class LaunchError(RuntimeError):
    pass


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(args: Sequence[str], world_size: int, timeout: float,
              env: dict[str, str] | None = None, python: str | None = None) -> list[RankResult]:
    """Runs `python args...` world_size times with torchrun's environment variables set.
    python: the interpreter (default: this one), e.g. a venv of another Python version."""
    port = free_port()
    base_env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size), **(env or {})}
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        processes, log_paths = [], []
        for rank in range(world_size):
            log_paths.append(os.path.join(logs, f"rank{rank}.log"))
            with open(log_paths[-1], "w") as log:
                processes.append(subprocess.Popen(
                    [python or sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                    env={**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    start_new_session=True))
        failure = _wait(processes, timeout)
        results = []
        for rank, (process, path) in enumerate(zip(processes, log_paths)):
            with open(path, errors="replace") as log:
                results.append(RankResult(rank, process.returncode, log.read()))
    if failure is not None:
        outputs = "\n".join(f"--- rank {r.rank} (exit {r.returncode}) ---\n{r.output[-4000:]}" for r in results)
        raise LaunchError(f"{' '.join(args)} on {world_size} ranks: {failure}\n{outputs}")
    return results


def _wait(processes: list[subprocess.Popen], timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    failed_at = None
    while True:
        codes = [p.poll() for p in processes]  # poll every process: returncode is only set by poll
        if None not in codes:
            break
        now = time.monotonic()
        if failed_at is None and any(code not in (None, 0) for code in codes):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + FAILURE_GRACE_SECONDS):
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            return f"timed out after {timeout:.0f}s" if failed_at is None else "a rank failed"
        time.sleep(0.05)
    return None if all(code == 0 for code in codes) else f"exit codes {codes}"
