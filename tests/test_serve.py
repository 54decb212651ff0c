"""The Serve application in-process: sessions over HTTP, their MJPEG and RTSP video, the API's
answers to bad requests, and the builder's overrides.

One Serve app (small model settings, RTSP pushed to a free port) on the run's shared Ray
and Serve (tests/conftest.py) is shared by the module; every test deletes the sessions it
made.
"""

from __future__ import annotations

import http.client
import io
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import av
import cv2
import numpy as np
import pytest
import requests

import deployments
import ray
from deployments import metrics as app_metrics
from dwm.client.api import ApiError, SessionClient
from dwm.client.session import Session
from dwm.client.wheel import DEFAULT_AXES, Axis, Wheel, drive
from deployments.served import EndedSessions, new_session_id
from dwm.config import ConfigError
from dwm.envs import DrivingEnv
from dwm.session import DrivingSession
from tests.waiting import eventually, free_port

ROOT = Path(__file__).resolve().parents[1]
# Small queue (N=6 steps, T=3: depth 2) so frames come out after 3 rounds.
FAST = {"pipeline.steps": "6", "pipeline.window": "3", "world.vehicles": "8"}
MAX_SESSIONS = 3
VIEWS, VIEW_H, VIEW_W = 3, 172, 304  # nusc_3views at pipeline.output_size
MODEL_W = 304  # pipeline.resolution width: one view of the layout PNG
MAX_BODY = 65536  # serve.max_body_bytes, the default
WAIT_S = 120.0  # upper bound for anything to happen; a healthy run takes a few seconds


# ----------------------------------------------------------------------------- the server


class Server:
    def __init__(self, base: str, rtsp_base: str, rtsp_port: int, record_dir: Path):
        self.base, self.rtsp_base, self.rtsp_port, self.record_dir = base, rtsp_base, rtsp_port, record_dir
        self.tokens: dict[str, str] = {}

    def create(self, **options) -> dict:
        r = requests.post(f"{self.base}/sessions", json=options or None, timeout=60)
        assert r.status_code == 201, r.text
        body = r.json()
        self.tokens[body["id"]] = body["token"]
        return body

    def auth(self, session_id: str) -> dict:
        return {"Authorization": f"Bearer {self.tokens[session_id]}"}

    def state(self, session_id: str) -> dict:
        r = requests.get(f"{self.base}/sessions/{session_id}", headers=self.auth(session_id), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def control(self, session_id: str, token: str | None = None, **changes) -> requests.Response:
        token = self.tokens[session_id] if token is None else token
        return requests.post(
            f"{self.base}/sessions/{session_id}/control", json=changes,
            headers={"Authorization": f"Bearer {token}"}, timeout=30,
        )

    def delete(self, session_id: str) -> requests.Response:
        r = requests.delete(
            f"{self.base}/sessions/{session_id}",
            headers={"Authorization": f"Bearer {self.tokens[session_id]}"}, timeout=60,
        )
        if r.status_code == 200:
            self.tokens.pop(session_id)
        return r

    def frames_in(self, session_id: str) -> int:
        return self.state(session_id)["stats"]["frames_in"]

    def wait_frames_out(self, session_id: str, n: int) -> dict:
        return eventually(
            lambda: (s := self.state(session_id))["stats"]["frames_out"] >= n and s,
            f"{n} frames out of session {session_id}",
        )

    def front_map(self, session_id: str) -> np.ndarray:
        """The front camera's map layout of the newest conditions: (H, W) bool, lines True."""
        r = eventually(
            lambda: (r := requests.get(f"{self.base}/sessions/{session_id}/layout.png?kind=map",
                                       headers=self.auth(session_id), timeout=30))
            .status_code == 200 and r,
            "a layout",
        )
        strip = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
        assert strip.shape[1] == VIEWS * MODEL_W
        return strip[:, MODEL_W : 2 * MODEL_W].max(axis=2) > 128  # CAM_FRONT is the middle view


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_runtime) -> Iterator[Server]:
    record_dir = tmp_path_factory.mktemp("recordings")
    rtsp_port = free_port()
    rtsp_base = f"rtsp://127.0.0.1:{rtsp_port}/dwm"
    app = deployments.app({
        **FAST, "serve.max_sessions": str(MAX_SESSIONS), "stream.rtsp.url": rtsp_base,
        "serve.graceful_shutdown_s": "1.0", "serve.record_dir": str(record_dir),
    })
    with ray_runtime.serve_app(app, "test-serve") as base:
        yield Server(base, rtsp_base, rtsp_port, record_dir)


@pytest.fixture
def api(server: Server) -> Iterator[Server]:
    """The server; the sessions a test creates are deleted after it."""
    yield server
    for session_id in list(server.tokens):
        server.delete(session_id)


def refusal(r: requests.Response, status: int) -> str:
    """The messages of an error answer, once its status and its shape are checked: every
    error answer is `{"detail": [{"loc": [...], "msg": "...", "type": "..."}]}`."""
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, r.text
    for item in detail:
        assert set(item) == {"loc", "msg", "type"} and isinstance(item["loc"], list), item
        assert isinstance(item["msg"], str) and isinstance(item["type"], str), item
    return "; ".join(item["msg"] for item in detail)


def raw_answer(base: str, head: list[str], body: bytes = b"") -> tuple[int, dict]:
    """Send a request's head (request line and headers) and `body` as they are, then read
    the answer: (status, JSON body). For what `requests` would not send."""
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=WAIT_S) as sock:
        sock.sendall("\r\n".join([*head, f"Host: {url.netloc}", "", ""]).encode() + body)
        response = http.client.HTTPResponse(sock, method=head[0].split()[0])
        response.begin()
        return response.status, json.loads(response.read())


# ----------------------------------------------------------------------------- MJPEG


class MjpegReader:
    """Reads the parts of a multipart/x-mixed-replace stream of JPEGs."""

    def __init__(self, url: str):
        self.response = requests.get(url, stream=True, timeout=WAIT_S)
        assert self.response.status_code == 200, self.response.text
        content_type = self.response.headers["content-type"]
        assert content_type.startswith("multipart/x-mixed-replace"), content_type
        self.boundary = b"--" + content_type.split("boundary=")[1].encode()
        self._chunks = self.response.iter_content(chunk_size=None)
        self._buffer = b""

    def _fill(self) -> bool:
        try:
            self._buffer += next(self._chunks)
            return True
        except StopIteration:
            return False

    def next_frame(self) -> tuple[dict, np.ndarray] | None:
        """(part headers, decoded RGB image), or None when the stream has ended."""
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                return None
        head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().strip().split("\r\n")
        assert lines[0] == self.boundary.decode(), lines
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        assert headers["content-type"] == "image/jpeg"
        size = int(headers["content-length"])
        while len(self._buffer) < size + 2:
            if not self._fill():
                return None
        jpeg, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
        image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None, "a part is not a JPEG"
        return headers, image[..., ::-1]

    def close(self) -> None:
        self.response.close()


def read_frames(server: Server, session_id: str, n: int) -> list[tuple[dict, np.ndarray]]:
    reader = MjpegReader(server.state(session_id)["streams"]["mjpeg"])  # its URL carries a viewer token
    try:
        return [reader.next_frame() for _ in range(n)]
    finally:
        reader.close()


# ----------------------------------------------------------------------------- tests


def test_two_sessions_at_once_each_get_their_own_mjpeg_video(api):
    a, b = api.create(), api.create()
    assert a["id"] != b["id"] and a["token"] != b["token"]
    url, _, query = a["streams"]["mjpeg"].partition("?token=")
    assert url == f"{api.base}/sessions/{a['id']}/video.mjpg" and query and query != a["token"]

    for session in (a, b):
        frames = read_frames(api, session["id"], 3)
        indices = [int(headers["x-frame-index"]) for headers, _ in frames]
        assert indices == sorted(set(indices))  # newer frames only, none repeated
        for _, image in frames:
            assert image.shape == (VIEW_H, VIEWS * VIEW_W, 3)

    # Each driver sees their own session in the list, nobody sees anything without a token.
    for session in (a, b):
        listed = requests.get(f"{api.base}/sessions", headers=api.auth(session["id"]), timeout=30).json()
        assert [s["id"] for s in listed] == [session["id"]] and "token" not in listed[0]
    assert requests.get(f"{api.base}/sessions", timeout=30).json() == []
    # The override pipeline.steps=6 pipeline.window=3 reached the sessions' queues (the
    # default config's queue is 5 deep).
    assert api.state(a["id"])["stats"]["queue_depth"] == 2


def _centre_x(lines: np.ndarray) -> float:
    return float(np.nonzero(lines)[1].mean())


def test_steering_one_session_left_moves_only_its_own_map_lines(api):
    a, b = api.create(autopilot=False), api.create(autopilot=False)
    for session in (a, b):
        api.wait_frames_out(session["id"], 1)
    a0, b0 = _centre_x(api.front_map(a["id"])), _centre_x(api.front_map(b["id"]))
    start = api.frames_in(a["id"])

    r = api.control(a["id"], steer=-1.0)
    assert r.status_code == 200, r.text
    assert r.json()["steer"] == -1.0

    # Turning left swings the road to the right in the front camera; the other car drives
    # straight on and its lines stay where they were.
    b_moves = []

    def a_turned() -> bool:
        b_moves.append(abs(_centre_x(api.front_map(b["id"])) - b0))
        return _centre_x(api.front_map(a["id"])) - a0 > 12

    eventually(a_turned, "session A's map lines to move right")
    assert api.frames_in(a["id"]) > start
    assert max(b_moves) < 5, b_moves
    assert api.state(b["id"])["control"]["steer"] == 0.0
    stats = api.state(a["id"])["stats"]
    assert stats["control_latency_frames"] is None or stats["control_latency_frames"] >= 1


def test_deleting_one_session_leaves_the_other_running(api):
    a, b = api.create(), api.create()
    api.wait_frames_out(b["id"], 1)
    reader = MjpegReader(a["streams"]["mjpeg"])
    assert reader.next_frame() is not None

    r = api.delete(a["id"])
    assert r.status_code == 200, r.text
    assert r.json()["id"] == a["id"]
    # Its stream ends, it is gone from the API, and its token no longer works.
    while reader.next_frame() is not None:
        pass
    reader.close()
    assert requests.get(f"{api.base}/sessions/{a['id']}", headers={"Authorization": f"Bearer {a['token']}"},
                        timeout=30).status_code == 404
    # What only its driver may do: the driver hears it has ended, another token is still not its.
    again = requests.delete(f"{api.base}/sessions/{a['id']}", headers={"Authorization": f"Bearer {a['token']}"}, timeout=30)
    assert "has ended" in refusal(again, 404)
    assert refusal(requests.delete(f"{api.base}/sessions/{a['id']}", headers={"Authorization": f"Bearer {b['token']}"},
                                   timeout=30), 403)
    assert requests.get(f"{api.base}/sessions", headers={"Authorization": f"Bearer {a['token']}"}, timeout=30).json() == []
    assert [s["id"] for s in requests.get(f"{api.base}/sessions", headers=api.auth(b["id"]), timeout=30).json()] == [b["id"]]

    before = api.state(b["id"])["stats"]["frames_out"]
    api.wait_frames_out(b["id"], before + 2)
    assert read_frames(api, b["id"], 1)[0][1].shape == (VIEW_H, VIEWS * VIEW_W, 3)


def test_a_session_is_seen_only_with_its_drivers_or_a_viewers_token(api):
    a, b = api.create(), api.create()
    api.wait_frames_out(a["id"], 1)
    url = f"{api.base}/sessions/{a['id']}"
    seen = (url, f"{url}/video.mjpg", f"{url}/layout.png")
    # Nobody else sees it: no token is 401, another session's token 403; the list shows nothing.
    for path in seen:
        assert "private" in refusal(requests.get(path, timeout=30), 401)
        r = requests.get(path, headers={"Authorization": f"Bearer {b['token']}"}, timeout=30)
        assert a["id"] in refusal(r, 403)
        assert refusal(requests.get(path, params={"token": b["token"]}, timeout=30), 403)
    assert requests.get(f"{api.base}/sessions", timeout=30).json() == []
    assert refusal(requests.get(f"{api.base}/sessions", params={"token": "x" * 300}, timeout=30), 422)

    # The driver shares a read-only view: its token sees the state, the video and the layout
    # (header or ?token=), and cannot drive, end or share the session.
    r = requests.post(f"{url}/share", headers=api.auth(a["id"]), timeout=30)
    assert r.status_code == 201, r.text
    shared = r.json()
    view = shared["token"]
    assert shared["id"] == a["id"] and view not in (a["token"], b["token"])
    assert shared["streams"]["mjpeg"] == f"{url}/video.mjpg?token={view}"
    state = requests.get(url, headers={"Authorization": f"Bearer {view}"}, timeout=30).json()
    assert state["id"] == a["id"] and state["streams"]["mjpeg"] == shared["streams"]["mjpeg"]
    assert requests.get(url, params={"token": view}, timeout=30).status_code == 200
    assert eventually(lambda: requests.get(f"{url}/layout.png", params={"token": view}, timeout=30).status_code == 200,
                      "the layout, seen with the viewer token")
    reader = MjpegReader(shared["streams"]["mjpeg"])
    assert reader.next_frame()[1].shape == (VIEW_H, VIEWS * VIEW_W, 3)
    reader.close()
    listed = requests.get(f"{api.base}/sessions", params={"token": view}, timeout=30).json()
    assert [s["id"] for s in listed] == [a["id"]]
    for token in (view, a["streams"]["mjpeg"].split("?token=")[1]):  # neither viewer token drives
        assert refusal(api.control(a["id"], token=token, steer=0.5), 403)
        r = requests.post(f"{url}/share", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert refusal(r, 403)
        assert requests.delete(url, headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 403
    assert "Authorization: Bearer" in refusal(requests.post(f"{url}/share", timeout=30), 401)
    # The token in a URL is a viewer's, never the driver's; and the session still drives.
    assert a["token"] not in a["streams"]["mjpeg"]
    assert api.control(a["id"], steer=0.2).status_code == 200


def test_bad_requests_get_clear_answers_and_leave_the_session_running(api):
    a, b = api.create(), api.create()
    api.wait_frames_out(a["id"], 1)
    assert api.control(a["id"], throttle=0.3).status_code == 200
    base, url = api.base, f"{api.base}/sessions/{a['id']}"

    # Another session's token, or none.
    r = api.control(a["id"], token=b["token"], steer=0.5)
    assert a["id"] in refusal(r, 403)
    r = requests.post(f"{url}/control", json={"steer": 0.5}, timeout=30)
    assert "Authorization: Bearer" in refusal(r, 401)
    r = requests.delete(url, headers={"Authorization": f"Bearer {b['token']}"}, timeout=60)
    assert r.status_code == 403
    # A token that is not even ASCII is just a wrong token (latin-1 bytes in the header).
    for method in (requests.post, requests.delete):
        r = method(url + ("/control" if method is requests.post else ""), json={"steer": 0.5},
                   headers={"Authorization": "Bearer caf\xe9-\xff".encode("latin-1")}, timeout=30)
        assert r.status_code == 403, r.text

    # Sessions that do not exist.
    for r in (
        requests.get(f"{base}/sessions/nosuch", timeout=30),
        requests.get(f"{base}/sessions/nosuch/video.mjpg", timeout=30),
        requests.post(f"{base}/sessions/nosuch/share", headers={"Authorization": f"Bearer {a['token']}"}, timeout=30),
        requests.post(
            f"{base}/sessions/nosuch/control", json={"steer": 0.1},
            headers={"Authorization": f"Bearer {a['token']}"}, timeout=30,
        ),
        requests.delete(f"{base}/sessions/nosuch", headers={"Authorization": f"Bearer {a['token']}"}, timeout=30),
    ):
        assert "nosuch" in refusal(r, 404)
    # What only a driver may do asks for credentials first: without a token, 401 whether or
    # not the session exists (after a DELETE, a retry without the token is still 401).
    for r in (requests.delete(f"{base}/sessions/nosuch", timeout=30),
              requests.post(f"{base}/sessions/nosuch/control", json={"steer": 0.1}, timeout=30),
              requests.post(f"{base}/sessions/nosuch/share", timeout=30)):
        assert "Authorization: Bearer" in refusal(r, 401)

    # Out of range, wrong types, unknown fields: 422 saying what is allowed.
    for changes, field, allowed in (
        ({"throttle": 1.5}, "throttle", "[0, 1]"),
        ({"steer": -2}, "steer", "[-1, 1]"),
        ({"brake": "full"}, "brake", "[0, 1]"),
        ({"reverse": "yes"}, "reverse", "true or false"),
        ({"wings": 1}, "wings", "throttle, steer, brake, reverse, hand_brake, autopilot"),
    ):
        r = api.control(a["id"], **changes)
        assert r.status_code == 422, r.text
        message = r.json()["detail"][0]["msg"]
        assert field in message and allowed in message, message
    r = requests.post(f"{base}/sessions", json={"colour": "red"}, timeout=30)
    assert r.status_code == 422 and "autopilot" in r.json()["detail"][0]["msg"]
    # A seed torch cannot take is refused with its range, not a server error.
    for seed in (2**53, 2**63, 2**64, 10**30):
        r = requests.post(f"{base}/sessions", json={"seed": seed}, timeout=30)
        assert r.status_code == 422, r.text
        assert "seed" in r.text and "2**53 - 1" in r.json()["detail"][0]["msg"], r.text
    for seed in (7.5, "7", True):
        r = requests.post(f"{base}/sessions", json={"seed": seed}, timeout=30)
        assert r.status_code == 422 and "whole number" in r.json()["detail"][0]["msg"], r.text
    api.create(seed=7.0)  # a whole number written as JSON Schema allows it

    # Too many sessions: refused with the reason, as a limit the client meets (not a server error).
    while len(api.tokens) < MAX_SESSIONS:
        api.create()
    r = requests.post(f"{base}/sessions", timeout=30)
    message = refusal(r, 429)
    assert int(r.headers["Retry-After"]) > 0
    assert "serve.max_sessions" in message and str(MAX_SESSIONS) in message

    # None of it touched the running session: its control is the last good one and it goes on.
    state = api.state(a["id"])
    assert state["control"]["throttle"] == 0.3 and state["control"]["steer"] == 0.0
    api.wait_frames_out(a["id"], state["stats"]["frames_out"] + 2)


def test_bodies_too_large_not_json_or_long_are_refused_with_short_answers(api):
    a = api.create(autopilot=False)
    owner, random_part = a["id"].split("-")  # its owner's replica tag, then 64 random bits
    assert owner.isalnum() and len(random_part) == 16 and int(random_part, 16) >= 0
    base, control = api.base, f"/sessions/{a['id']}/control"
    auth = {"Authorization": f"Bearer {a['token']}"}

    # Over serve.max_body_bytes: 413 naming the limit. By its Content-Length, answered before
    # a byte of the body is sent ...
    status, answer = raw_answer(base, ["POST /sessions HTTP/1.1", "Content-Type: application/json",
                                       f"Content-Length: {10 * 2**20}", "Connection: close"])
    assert status == 413 and answer["detail"][0]["loc"] == ["body"], answer
    assert answer["detail"][0]["type"] == "body_too_large" and str(MAX_BODY) in answer["detail"][0]["msg"]
    # ... and sent chunked, with no length, once the bytes received pass the limit.
    padding = json.dumps({"steer": 0.1, "pad": "x" * (2 * MAX_BODY)}).encode()
    chunks = [padding[i : i + 8192] for i in range(0, len(padding), 8192)]
    status, answer = raw_answer(
        base, [f"POST {control} HTTP/1.1", "Content-Type: application/json", "Transfer-Encoding: chunked",
               f"Authorization: Bearer {a['token']}", "Connection: close"],
        b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n",
    )
    assert status == 413 and answer["detail"][0]["type"] == "body_too_large", answer
    # A 10 MB body, as a client sends one.
    r = requests.post(f"{base}/sessions", data=b"{" + b" " * (10 * 2**20) + b"}",
                      headers={"Content-Type": "application/json"}, timeout=WAIT_S)
    assert str(MAX_BODY) in refusal(r, 413)

    # A request for another host name (DNS rebinding: a page of another site resolved to
    # this machine) is refused, whatever it asks; this host's names are answered.
    r = requests.post(f"{base}/sessions", json={}, headers={"Host": "attacker.example"}, timeout=30)
    assert r.status_code == 400 and "host" in r.text.lower(), r.text
    assert requests.get(f"{base}/sessions", headers={"Host": "localhost"}, timeout=30).status_code == 200

    # A long input (under the limit) is repeated back by its start only.
    for r in (
        requests.post(f"{base}{control}", json={"throttle": "x" * 60000}, headers=auth, timeout=30),
        requests.post(f"{base}/sessions", json={"y" * 60000: True}, timeout=30),
    ):
        message = refusal(r, 422)
        assert len(r.content) < 2000 and "chars)" in message, message

    # A body that is not JSON (a browser sends text/plain from any page without asking):
    # 415 naming application/json. No body at all still starts a session.
    for path in ("/sessions", control):
        r = requests.post(f"{base}{path}", data='{"autopilot": true}', headers={**auth, "Content-Type": "text/plain"},
                          timeout=30)
        assert "application/json" in refusal(r, 415)
        r = requests.post(f"{base}{path}", data='{"autopilot": true}', headers=auth, timeout=30)  # no Content-Type
        assert "application/json" in refusal(r, 415)
    r = requests.post(f"{base}{control}", data='{"steer": -0.2}', timeout=30,
                      headers={**auth, "Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["steer"] == -0.2, r.text
    r = requests.post(f"{base}/sessions", timeout=30)
    assert r.status_code == 201, r.text
    api.tokens[r.json()["id"]] = r.json()["token"]

    # The layout's kind: an unknown session first, whatever the kind; then the kinds allowed.
    assert "nosuch" in refusal(requests.get(f"{base}/sessions/nosuch/layout.png?kind=bad", timeout=30), 404)
    r = requests.get(f"{base}/sessions/{a['id']}/layout.png?kind=bad", headers=api.auth(a["id"]), timeout=30)
    assert "map, boxes, both" in refusal(r, 422) and r.json()["detail"][0]["loc"] == ["query", "kind"]
    # Starlette's own refusals have the same shape.
    refusal(requests.get(f"{base}/nowhere", timeout=30), 404)
    refusal(requests.put(f"{base}/sessions", timeout=30), 405)


# Every (path, method) of the API and the statuses it answers with.
ANSWERS = {
    ("/", "get"): {200, 413},
    ("/sessions", "get"): {200, 413, 422, 503},
    ("/sessions", "post"): {201, 400, 403, 413, 415, 422, 429, 503},
    ("/sessions/{session_id}", "get"): {200, 401, 403, 404, 413, 422, 503},
    ("/sessions/{session_id}", "delete"): {200, 401, 403, 404, 413, 422, 503},
    ("/sessions/{session_id}", "patch"): {200, 400, 401, 403, 404, 413, 415, 422, 503},
    ("/sessions/{session_id}/recording.mp4", "get"): {200, 401, 403, 404, 409, 413, 422, 503},
    ("/sessions/{session_id}/control", "post"): {200, 400, 401, 403, 404, 413, 415, 422, 503},
    ("/sessions/{session_id}/share", "post"): {201, 401, 403, 404, 413, 422, 503},
    ("/sessions/{session_id}/video.mjpg", "get"): {200, 401, 403, 404, 413, 422, 503},
    ("/sessions/{session_id}/layout.png", "get"): {200, 204, 401, 403, 404, 413, 422, 503},
    ("/pipelines", "get"): {200, 413, 503},
}


def test_openapi_declares_every_answer_of_every_route(api):
    spec = requests.get(f"{api.base}/openapi.json", timeout=30).json()
    routes = {(path, method): op for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert set(routes) == set(ANSWERS)
    for route, op in routes.items():
        assert {int(code) for code in op["responses"]} == ANSWERS[route], route
        for code, answer in op["responses"].items():
            if int(code) >= 400:
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorAnswer"}, (route, code)
    item = spec["components"]["schemas"]["ErrorItem"]
    assert set(item["properties"]) == {"loc", "msg", "type"} and set(item["required"]) == {"loc", "msg", "type"}
    detail = spec["components"]["schemas"]["ErrorAnswer"]["properties"]["detail"]
    assert detail["type"] == "array" and detail["items"] == {"$ref": "#/components/schemas/ErrorItem"}
    # The token is the bearer scheme /docs offers to authorize with: needed by what only the
    # driver may do, one way among others (`?token=`, public viewing) where a session is seen.
    scheme, = spec["components"]["securitySchemes"].items()
    assert scheme[1]["type"] == "http" and scheme[1]["scheme"] == "bearer"
    bearer = {scheme[0]: []}
    for route in [("/sessions/{session_id}", "delete"), ("/sessions/{session_id}", "patch"),
                  ("/sessions/{session_id}/control", "post"), ("/sessions/{session_id}/share", "post")]:
        assert routes[route]["security"] == [bearer], route
    for route in [("/sessions", "get"), ("/sessions/{session_id}", "get"), ("/sessions/{session_id}/video.mjpg", "get")]:
        assert routes[route]["security"] == [bearer, {}], route
    assert "security" not in routes[("/sessions", "post")]


def test_session_ids_are_new_random_64_bits():
    drawn = iter(["00000000000000aa", "00000000000000aa", "00000000000000bb"])
    assert new_session_id({"00000000000000aa"}, lambda: next(drawn)) == "00000000000000bb"
    ids = {new_session_id(()) for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_ended_sessions_are_remembered_by_a_token_digest_and_bounded():
    ended = EndedSessions(limit=2)
    for n in range(3):
        ended.add(f"{n:016x}", f"token-{n}")
    assert list(ended) == [f"{1:016x}", f"{2:016x}"]  # the oldest forgotten
    assert ended.ended_by(f"{2:016x}", "token-2") and not ended.ended_by(f"{2:016x}", "token-1")
    assert not ended.ended_by(f"{2:016x}", None) and not ended.ended_by(f"{2:016x}", "t\u00e9\udcff")
    assert "token-2" not in repr(vars(ended))


def test_fps_of_a_slow_session_is_measured_from_its_last_frames():
    # 0.2 frames/s: never two frames in serve.fps_window (5 s) between frames, still 0.2 fps.
    now = [0.0]
    session = DrivingSession("ego", None, 0, fps_window=5.0, clock=lambda: now[0])

    def frame_out(at: float) -> None:
        now[0] = at
        conditions = SimpleNamespace(sim_time=at)
        session.pushed(SimpleNamespace(sim_time=at), SimpleNamespace(sim_time=at, unpack=lambda: conditions), 0)
        assert len(session.delivered([SimpleNamespace(index=session.frames_out, images=None)])) == 1

    frame_out(0.0)
    now[0] = 3.0
    assert session.fps() == 0.0  # one frame: no rate yet
    for at in (5.0, 10.0, 15.0):
        frame_out(at)
        for later in (0.0, 0.1, 2.5, 4.9):
            now[0] = at + later
            assert session.fps() == pytest.approx(0.2), now[0]
    # Slower still: 0.1 frames/s.
    frame_out(25.0)
    now[0] = 29.0
    assert session.fps() == pytest.approx(0.1)
    # Stopped: falls with the time since the last frame.
    now[0] = 65.0
    assert session.fps() == pytest.approx(1 / 40)
    # Fast again: over the window, as before.
    for k in range(1, 21):
        frame_out(65.0 + 0.25 * k)
    assert session.fps() == pytest.approx(4.0)


def test_the_api_keeps_its_names_and_serves_the_page_and_docs(api):
    paths = requests.get(f"{api.base}/openapi.json", timeout=30).json()["paths"]
    assert set(paths["/sessions"]) == {"get", "post"}
    assert set(paths["/sessions/{session_id}"]) == {"get", "delete", "patch"}
    assert set(paths["/sessions/{session_id}/control"]) == {"post"}
    assert "get" in paths["/sessions/{session_id}/video.mjpg"]
    assert requests.get(f"{api.base}/docs", timeout=30).status_code == 200
    page = requests.get(f"{api.base}/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/sessions" in page.text and "<img" in page.text


def test_the_python_client_drives_a_session_and_reports_refusals(api):
    client = SessionClient.create(api.base, {"autopilot": True})
    api.tokens[client.id] = client.token
    assert client.state()["control"]["autopilot"] is True
    control = client.control(autopilot=False, throttle=0.8)
    assert control["autopilot"] is False and control["throttle"] == 0.8
    with pytest.raises(ApiError, match=r"422 .*steer.*\[-1, 1\]"):
        client.control(steer=3)
    with pytest.raises(ApiError) as refused:
        SessionClient(api.base, client.id, "not-the-token").control(steer=0.1)
    assert refused.value.status == 403
    assert client.delete()["id"] == client.id
    api.tokens.pop(client.id)
    with pytest.raises(ApiError) as gone:
        client.state()
    assert gone.value.status == 404


def test_a_program_drives_over_http_with_numbered_controls_and_frames_as_arrays(api):
    with Session.over_http(api.base, {"seed": 4}) as session:
        assert session.camera_names == ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT"]
        assert session.control(throttle=0.6) == 1
        first = session.next_frame()
        assert first.views.shape == (VIEWS, VIEW_H, VIEW_W, 3) and first.views.dtype == np.uint8
        assert first.hdmap.shape == first.boxes.shape == (VIEWS, 176, MODEL_W, 3)
        assert first.ego.lane_offset is not None and first.ego.sim_time >= first.sim_time
        assert session.control(steer=-0.3) == 2
        frames = [first]
        while frames[-1].control_seq < 2:  # the MJPEG stream gives the newest frame each time
            assert len(frames) < 40, "the control never showed"
            frames.append(session.next_frame())
        assert [f.index for f in frames] == sorted({f.index for f in frames})
        assert [f.control_seq for f in frames] == sorted(f.control_seq for f in frames)
        state = SessionClient(api.base, session.client.id, session.client.token).state()
        assert state["control"]["seq"] == 2 and state["cameras"] == session.camera_names
        with pytest.raises(ApiError, match="steer"):
            session.control(steer=5)
        client = session.client
    with pytest.raises(ApiError) as ended:  # leaving the block ended the session
        client.state()
    assert ended.value.status == 404

    env = DrivingEnv(api.base, [f"{k}={v}" for k, v in FAST.items()])
    try:
        obs, info = env.reset(seed=5)
        assert env.observation_space.contains(obs), {k: (v.shape, v.dtype) for k, v in obs.items()}
        obs, reward, terminated, truncated, info = env.step([0.5, 0.0, 0.0])
        assert info["control_seq"] >= 0 and env.observation_space.contains(obs)
    finally:
        env.close()


def exported_metrics(url: str) -> set[str]:
    """Names of the metric series in a Prometheus text export (histograms' _bucket/_sum/_count included)."""
    names = set()
    for line in requests.get(url, timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_the_librarys_log_lines_are_in_the_replicas_logs(api):
    # The line the library logs when it builds the model (dwm.models.checkpoint), in the
    # QueueServer replica's log file among Serve's own lines.
    folder = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def model_line() -> list[str]:
        return [line for log in folder.glob("replica_test-serve_QueueServer_*.log")
                for line in log.read_text(errors="replace").splitlines() if "model tiny: denoiser of" in line]

    lines = eventually(model_line, "the model line in the QueueServer replica's log")
    assert "random weights" in lines[0] and "INFO" in lines[0]


def test_the_grafana_dashboard_draws_metrics_the_app_exports(api):
    dashboard = json.loads((ROOT / "deployments" / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queried = {name for e in exprs for name in re.findall(r"\bray_dwm_\w+", e)}
    # Every metric of the app is on the dashboard.
    defined = {f"ray_{m().info['name']}" for m in vars(app_metrics).values()
               if callable(m) and getattr(m, "__module__", "") == app_metrics.__name__ and m.__name__ != "cache"}
    assert {q.removesuffix("_bucket").removesuffix("_total") for q in queried} == defined

    # A session driven with a control, until that control shows: every series the dashboard
    # queries is in Ray's metrics export (this node's metrics_export_port).
    session = api.create()
    api.wait_frames_out(session["id"], 1)
    assert api.control(session["id"], steer=0.2).status_code == 200
    eventually(lambda: api.state(session["id"])["stats"]["control_latency_s"] is not None, "the control to show")
    port = ray._private.worker.global_worker.node.metrics_export_port
    eventually(lambda: queried <= exported_metrics(f"http://127.0.0.1:{port}/metrics"),
               "every metric the dashboard draws in Ray's export")
    api.delete(session["id"])


def test_a_new_session_tells_how_far_its_warm_up_is(api):
    session = api.create()
    seen = []

    def running():
        state = api.state(session["id"])
        seen.append((state["state"], state["progress"], state["stats"]["frames_in"], state["stats"]["queue_depth"]))
        return state["state"] == "running"

    eventually(running, "the session's first picture")
    assert seen[-1][:2] == ("running", 1.0)
    warming = [(progress, frames_in, depth) for state, progress, frames_in, depth in seen if state == "warming"]
    for progress, frames_in, depth in warming:  # the frames pushed of those until the first picture
        assert progress == pytest.approx(min(frames_in / (depth + 1), 1.0), abs=1e-3)
    assert [p for p, _, _ in warming] == sorted(p for p, _, _ in warming)  # it only grows
    api.delete(session["id"])


def test_the_wheel_client_drives_a_session_with_recorded_wheel_input(api):
    client = SessionClient.create(api.base)
    api.tokens[client.id] = client.token
    wheel = Wheel(*(Axis.parse(name, spec) for name, spec in DEFAULT_AXES.items()))
    # A wheel turned left a quarter, throttle pedal (axis 5) at 0.6, then reverse toggled.
    feed = iter([([-0.25, 0.0, 0.0, 0.0, 0.0, 0.6], []), ([-0.25, 0.0, 0.0, 0.0, 0.0, 0.6], [1])])
    drive(wheel, lambda: next(feed), lambda control: client.control(**control), ticks=2, sleep=lambda s: None)
    control = client.state()["control"]
    assert (control["steer"], control["throttle"], control["brake"], control["reverse"]) == (-0.25, 0.6, 0.0, True)
    assert client.delete()["id"] == client.id
    api.tokens.pop(client.id)


# ----------------------------------------------------------------------------- RTSP


def receive(url: str, out: mp.Queue) -> None:
    """FFmpeg's RTSP listen mode in a child process (PyAV holds the GIL while a publisher
    connects, so it cannot share a process with one): sends back each decoded frame's shape."""
    try:
        options = {"rtsp_flags": "listen", "listen_timeout": "60", "probesize": "32", "analyzeduration": "0"}
        with av.open(url, options=options, timeout=(60.0, 30.0)) as c:
            for packet in c.demux(c.streams.video[0]):
                for frame in packet.decode():
                    out.put(("frame", frame.to_ndarray(format="rgb24").shape))
        out.put(("done", None))
    except BaseException as e:
        out.put(("error", repr(e)))


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port` (from /proc, without connecting to it)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "0A":
                    return True
    return False


def test_rtsp_gets_the_sessions_frames(api):
    assert not api.tokens  # the sessions of earlier tests are gone: no other publisher
    ctx = mp.get_context("spawn")
    frames: mp.Queue = ctx.Queue()
    receiver = ctx.Process(target=receive, args=(f"{api.rtsp_base}/any", frames), daemon=True)
    receiver.start()
    try:
        eventually(lambda: listening(api.rtsp_port), "the RTSP receiver to listen")
        session = api.create()
        assert session["streams"]["rtsp"] == f"{api.rtsp_base}/{session['id']}"
        api.wait_frames_out(session["id"], 5)
        final = api.delete(session["id"]).json()["stats"]

        shapes = []
        while True:
            kind, value = frames.get(timeout=60)
            if kind == "done":
                break
            assert kind == "frame", f"the RTSP receiver failed: {value}"
            shapes.append(value)
    finally:
        receiver.kill()
        receiver.join(timeout=10)

    # Every frame the session made went out (or was counted as dropped, should the encoder
    # have fallen behind), and the receiver decoded exactly the frames that went out.
    rtsp = final["rtsp"]
    assert rtsp["error"] is None
    assert rtsp["published"] + rtsp["dropped"] == final["frames_out"] >= 5
    assert len(shapes) == rtsp["published"] + 1 > 1  # the last picture is sent again as the stream ends
    assert set(shapes) == {(VIEW_H, VIEWS * VIEW_W, 3)}


def test_a_recorded_session_leaves_an_mp4_of_its_frames_even_when_rtsp_fails(api):
    # Nothing listens on the RTSP port now: the push fails, the recording must not.
    session = api.create(record=True)
    assert api.wait_frames_out(session["id"], 4)["options"]["record"] is True
    final = api.delete(session["id"]).json()["stats"]
    assert final["rtsp"]["error"] is not None and "RTSP" in final["rtsp"]["error"]
    recording = final["recording"]
    assert recording["error"] is None
    assert recording["published"] + recording["dropped"] == final["frames_out"] >= 4

    with av.open(str(api.record_dir / f"{session['id']}.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == recording["published"] > 0
    assert frames[0].shape == (VIEW_H, VIEWS * VIEW_W, 3)


def test_a_driver_turns_the_overlay_off_and_records_while_driving_and_anyone_watching_downloads_it(api):
    session = api.create(overlay=True)
    sid, url = session["id"], f"{api.base}/sessions/{session['id']}"
    api.wait_frames_out(sid, 1)
    viewer = requests.post(f"{url}/share", headers=api.auth(sid), timeout=30).json()["token"]
    # Nothing recorded yet: the answer says how to record.
    assert "PATCH" in refusal(requests.get(f"{url}/recording.mp4?token={viewer}", timeout=30), 409)
    # A viewer cannot change the session; unknown fields and non-JSON bodies are refused.
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    assert requests.patch(url, json={"record": True}, headers=as_viewer, timeout=30).status_code == 403
    assert requests.patch(url, json={"record": True}, timeout=30).status_code == 401
    assert "colour" in refusal(requests.patch(url, json={"colour": "red"}, headers=api.auth(sid), timeout=30), 422)
    assert requests.patch(url, data="record=1", headers=api.auth(sid), timeout=30).status_code == 415

    r = requests.patch(url, json={"overlay": False, "record": True}, headers=api.auth(sid), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["options"]["overlay"] is False and r.json()["options"]["record"] is True
    eventually(lambda: (api.state(sid)["stats"]["recording"] or {}).get("published", 0) >= 3, "3 frames recorded")
    stopped = requests.patch(url, json={"record": False}, headers=api.auth(sid), timeout=60).json()
    assert stopped["options"]["record"] is False and stopped["stats"]["recording"] is None
    assert stopped["stats"]["recordings"] == 1

    # The finished MP4, downloaded with the viewer's link (as a browser's download link does).
    r = requests.get(f"{url}/recording.mp4?token={viewer}", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert f'filename="{sid}.mp4"' in r.headers["content-disposition"]
    with av.open(io.BytesIO(r.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) >= 3 and frames[0].shape == (VIEW_H, VIEWS * VIEW_W, 3)
    # The session goes on; a second recording is a second file, and the newest is downloaded.
    requests.patch(url, json={"record": True}, headers=api.auth(sid), timeout=30)
    eventually(lambda: (api.state(sid)["stats"]["recording"] or {}).get("published", 0) >= 1, "a frame recorded")
    requests.patch(url, json={"record": False}, headers=api.auth(sid), timeout=60)
    r = requests.get(f"{url}/recording.mp4", headers=api.auth(sid), timeout=60)
    assert f'filename="{sid}-2.mp4"' in r.headers["content-disposition"]
    assert api.state(sid)["state"] == "running"


# ----------------------------------------------------------------------------- the builder


@pytest.mark.parametrize(
    "override, named",
    [
        ({"world.mapp": "merge"}, "world.mapp"),
        ({"world.map": "moon"}, "moon"),
        ({"pipeline.bands": "5"}, "bands"),
        ({"serve.clock": "sundial"}, "serve.clock"),
        ({"serve.max_sessions": "0"}, "serve.max_sessions"),
        ({"serve.max_body_bytes": "0"}, "serve.max_body_bytes"),
        ({"serve.allowed_hosts": "[]"}, "serve.allowed_hosts"),
        ({"serve.public_viewing": "yes"}, "serve.public_viewing"),
        ({"pipeline.cfg_parallel": "true", "pipeline.bands": "2"}, "pipeline.cfg_parallel=true runs with pipeline.bands=1"),
        ({"serve.http_port": "8100"}, "python -m deployments serve.http_port=PORT"),
        ({"serve.stage.compiled_graph": "sometimes"}, "serve.stage.compiled_graph"),
        ({"serve.stage.transport": "pigeon"}, "serve.stage.transport=pigeon: must be 'auto' or 'cpu_communicator'"),
        ({"serve.health_check_s": "0"}, "serve.health_check_s"),
        ({"serve.trim_every_s": "-1"}, "serve.trim_every_s"),
        ({"world.map": "maps/Town99.xodr"}, "world.map='maps/Town99.xodr': no such file"),
    ],
)
def test_builder_refuses_a_bad_override_naming_it(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        deployments.app(override)


def test_builder_takes_serve_run_string_arguments():
    # `serve run deployments:app world.map=merge pipeline.guidance=1.0` passes strings.
    assert deployments.app({"world.map": "merge", "pipeline.guidance": "1.0"}) is not None


def test_serve_run_with_a_bad_override_stops_naming_the_key():
    serve_cli = Path(sys.executable).with_name("serve")
    result = subprocess.run(
        [str(serve_cli), "run", "deployments:app", "world.mapp=merge"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    assert "world.mapp: no such config key" in result.stderr + result.stdout
