"""What the Serve and streaming tests share: a free local port, and waiting for what a user
would see (with a failure that names it)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eventually(check: Callable[[], object], what: str, timeout: float = 120.0, every: float = 0.2):
    """Poll `check` until it returns something truthy, and return that; fail naming `what`
    after `timeout` s (an upper bound: a healthy run takes a few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(every)
