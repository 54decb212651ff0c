"""`python -m deployments`, the command that serves the app on one machine: it starts a Ray of its
own (never one already running there), every port of that Ray listens on 127.0.0.1 only and
Ray's token authentication stays on, its app has a name of its own, and Ctrl-C leaves nothing
behind. A busy HTTP port stops it before anything starts.

Linux only: the listening sockets are read from /proc.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from deployments.__main__ import listening_sockets
from tests.test_serve_lifecycle import processes_in_session
from tests.waiting import eventually, free_port

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets from /proc (Linux)")

ROOT = Path(__file__).resolve().parents[1]
FAST = ["pipeline.steps=6", "pipeline.window=3", "world.vehicles=8", "serve.graceful_shutdown_s=1.0"]
WAIT_S = 240.0  # an upper bound for the start on a loaded 2-core machine; a healthy one takes 30-60 s
GCS_CLIENT = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", namespace=None, timeout=30)
except Exception as err:
    print(type(err).__name__, err)
else:
    print("connected")
"""


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """RAY_TMPDIR for the command: its Ray's files apart from any other Ray's (a short path:
    Ray's Unix sockets live under it)."""
    path = Path(tempfile.mkdtemp(prefix="dwm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def command_env(ray_tmpdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    return {**env, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmpdir), **extra}


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, a dual-stack socket's
    return (mapped or address).is_loopback


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def gcs_client(address: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", GCS_CLIENT, address], env=env, capture_output=True,
                          text=True, timeout=120)
    return done.stdout.strip()


def kill_session(sid: int) -> None:
    for pid, _ in processes_in_session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_serves_on_a_ray_of_its_own_listening_on_loopback_with_token_auth(tmp_path, ray_tmpdir):
    # What `ray start` leaves for Ray to find: a command that attaches to whatever Ray runs on
    # the machine would try this address (nothing listens there) rather than start its own.
    (ray_tmpdir / "ray").mkdir()
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))  # the token Ray finds, so ~/.ray is left alone
    env = command_env(ray_tmpdir, RAY_AUTH_TOKEN_PATH=str(token))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "deployments.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments", f"serve.http_port={port}", "--name", "launch-test", *FAST],
        cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        # Its own session, so every process it starts can be found; SIGINT as a terminal sends it.
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def serving() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"python -m deployments exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        # Said once every replica is up (so has opened every port it will).
        return f"serving 'launch-test' on {url}/" in log.read_text()

    try:
        eventually(serving, "python -m deployments to say it serves", timeout=WAIT_S, every=0.5)
        assert requests.get(f"{url}/sessions", timeout=30).status_code == 200
        assert requests.get(f"{url}/-/routes", timeout=30).json() == {"/": "launch-test"}

        commands = dict(processes_in_session(proc.pid))
        ours = set(commands)
        listeners = [(ip, p, pids & ours) for ip, p, pids in listening_sockets() if pids & ours]
        gcs = [p for _, p, pids in listeners if any(process_name(pid) == "gcs_server" for pid in pids)]
        assert gcs, f"no GCS among its processes: it did not start a Ray of its own\n{commands}"
        assert port in {p for _, p, _ in listeners}
        exposed = [(ip, p, [commands.get(pid) for pid in pids]) for ip, p, pids in listeners if not is_loopback(ip)]
        assert exposed == [], f"listening beyond 127.0.0.1: {exposed}"

        # Token authentication: a client without the token is turned away, one with it is not.
        without = gcs_client(f"127.0.0.1:{gcs[0]}", {**env, "RAY_AUTH_MODE": "disabled"})
        assert without.startswith("AuthenticationError"), without
        assert gcs_client(f"127.0.0.1:{gcs[0]}", {**env, "RAY_AUTH_MODE": "token"}) == "connected"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        eventually(lambda: processes_in_session(proc.pid) == [], "every process it started to end", timeout=60)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_session(proc.pid)


def test_a_busy_http_port_stops_it_before_anything_starts(ray_tmpdir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments", f"serve.http_port={port}"],
            cwd=ROOT, env=command_env(ray_tmpdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            kill_session(proc.pid)
    assert proc.returncode == 2, out + err
    assert f"127.0.0.1:{port}" in err and f"pid {os.getpid()}" in err, err  # the address, and who has it
    assert not (ray_tmpdir / "ray").exists(), "a Ray was started"  # ray.init makes its session folder there
