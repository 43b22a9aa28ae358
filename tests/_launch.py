"""Starting multi-process runs from the slow tests: a free port, the offline environment, and one
retry when the port was taken between choosing it and the launcher binding it (another test
process on the same machine may pick the same free port)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT_TAKEN = ("Address already in use", "EADDRINUSE", "address already in use")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(make_cmd, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``make_cmd(port)`` from the repository root; once more with another port if the first
    one was taken. The caller checks the return code."""
    for attempt in range(2):
        proc = subprocess.run(make_cmd(free_port()), cwd=ROOT, env=env(), capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode == 0 or attempt or not any(s in proc.stderr for s in PORT_TAKEN):
            return proc
    return proc
