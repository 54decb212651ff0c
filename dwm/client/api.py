"""A small client of the driving-session HTTP API (`deployments/ingress.py`), on urllib."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

DELETE_TIMEOUT_S = 60.0  # s a DELETE may take: the round in progress, then the video's last frames


class ApiError(RuntimeError):
    """The server refused a request (status and its reason) or could not be reached."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class SessionClient:
    """One driving session: `url` of the server, the session's `id` and `token`."""

    url: str
    id: str
    token: str
    timeout: float = 10.0

    @classmethod
    def create(cls, url: str, options: dict | None = None, timeout: float = 30.0) -> "SessionClient":
        body = request(url, "POST", "/sessions", options or {}, timeout=timeout)
        return cls(url, body["id"], body["token"])

    def state(self) -> dict:
        return request(self.url, "GET", f"/sessions/{self.id}", token=self.token, timeout=self.timeout)

    def share(self) -> dict:
        """A read-only viewer token and the stream URLs with it: {id, token, streams}."""
        return request(self.url, "POST", f"/sessions/{self.id}/share", token=self.token, timeout=self.timeout)

    def control(self, **changes) -> dict:
        """Merge changes (throttle, steer, brake, reverse, hand_brake, autopilot) into the sticky control."""
        return request(self.url, "POST", f"/sessions/{self.id}/control", changes, self.token, self.timeout)

    def delete(self) -> dict:
        """End the session. The answer comes once the round in progress is over and the video is
        fully written, which can take several rounds on a busy server: waits at least 60 s."""
        timeout = max(self.timeout, DELETE_TIMEOUT_S)
        return request(self.url, "DELETE", f"/sessions/{self.id}", token=self.token, timeout=timeout)


def request(url: str, method: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 10.0):
    """One JSON request; returns the decoded answer or raises ApiError with the server's reason."""
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        raise ApiError(f"{method} {path}: {err.code} {_reason(err.read())}", err.code) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ApiError(f"cannot reach the server at {url}: {reason}") from None
    return json.loads(raw) if raw else None


def _reason(raw: bytes) -> str:
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:200]
    if isinstance(detail, list):
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """--url, --session, --token: the session a client drives (a new one without --session)."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the Serve app (default %(default)s)")
    parser.add_argument("--session", help="session id; leave out to start a new session")
    parser.add_argument("--token", help="the session's token (from POST /sessions)")


def check_session_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.session and not args.token:
        parser.error("--session needs the session's --token (it came with the session's id)")


def open_session(args: argparse.Namespace) -> SessionClient:
    """The session of `add_session_options`' arguments (checked to exist), or a new one; says
    on stderr which one and where its video is. ApiError when the server refuses or is away."""
    if args.session:
        client = SessionClient(args.url, args.session, args.token)
        client.state()  # the session exists (404 otherwise)
    else:
        client = SessionClient.create(args.url)
        print(f"session {client.id}  token {client.token}", file=sys.stderr)
    print(f"video: {client.state()['streams']['mjpeg']}", file=sys.stderr)
    return client
