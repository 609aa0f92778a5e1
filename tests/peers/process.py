"""Stopping the peers the tests start: by the PID of the process they started, never by name."""

from __future__ import annotations

import subprocess

__all__ = ["stop_process"]

STOP_GRACE_S = 5.0
"""Seconds a peer has to exit after SIGTERM before it is killed."""


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`; a process already gone is left alone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
