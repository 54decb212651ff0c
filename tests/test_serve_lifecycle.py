"""`serve run deployments:app`, the user's command, and Ctrl-C on it: the app serves a session,
then SIGINT shuts it down and leaves no stray process (Ray's own included) behind.

`serve run` always listens on 127.0.0.1:8000, so this test needs that port free.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"
WAIT_S = 120.0


def processes_in_session(sid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose session id is `sid`."""
    rows = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for row in rows.splitlines():
        pid, session, args = (row.split(None, 2) + [""])[:3]
        if int(session) == sid:
            found.append((int(pid), args[:100]))
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_on_serve_run_stops_everything_it_started(tmp_path):
    if port_open(8000):
        pytest.fail("port 8000 is taken; `serve run` needs it (stop what listens there)")
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("serve")), "run", "deployments:app",
         "pipeline.steps=6", "pipeline.window=3", "world.vehicles=8", "serve.graceful_shutdown_s=1.0"],
        cwd=ROOT, # A Ray of its own (RAY_ADDRESS=local), never one another test process started.
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)},
        stdout=log.open("w"), stderr=subprocess.STDOUT,
        # Its own session, so every process it starts can be found afterwards; SIGINT as a
        # terminal delivers it, even where this test runs with SIGINT ignored.
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + WAIT_S
        created = None
        while created is None:
            assert proc.poll() is None, f"serve run exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"serve run did not come up:\n{log.read_text()[-3000:]}"
            try:
                r = requests.post(f"{URL}/sessions", timeout=60)
                created = r.json() if r.status_code == 201 else None
            except requests.ConnectionError:
                time.sleep(0.5)
        auth = {"Authorization": f"Bearer {created['token']}"}
        while requests.get(f"{URL}/sessions/{created['id']}", headers=auth, timeout=10).json()["stats"]["frames_out"] < 1:
            assert time.monotonic() < deadline, "the session made no frame"
            time.sleep(0.5)
        assert len(processes_in_session(proc.pid)) > 3  # the CLI, Ray's services, the replicas

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while (left := processes_in_session(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], f"processes left after Ctrl-C: {left}"
        assert not port_open(8000)
    finally:
        for pid, _ in processes_in_session(proc.pid):  # whatever a failed run left
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
