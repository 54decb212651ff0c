"""What the Serve and streaming tests share: a free local port, waiting for what a user would
see (with a failure that names it), and a viewer watching a session's MJPEG stream."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import pytest
import requests


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


class StreamWatcher(threading.Thread):
    """Reads a session's MJPEG stream in the background as a viewer would, keeping the frame
    indices seen (`indices`) and how the stream broke, if it did (`error`)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.indices, self.stop = url, [], threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with requests.get(self.url, stream=True, timeout=120) as r:
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line.startswith(b"X-Frame-Index:"):
                        self.indices.append(int(line.split(b":")[1]))
        except requests.RequestException as e:
            if not self.stop.is_set():
                self.error = e


def serve_replica(app: str, deployment: str, tag: str = ""):
    """The actor of the one replica of `deployment` in the Serve app `app` (the one with replica
    tag `tag`, when given), to kill it as a fault would."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#{tag}" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
