"""The HTTP API (FastAPI; OpenAPI at /docs). Stateless: the sessions live in the SessionManager."""

# No `from __future__ import annotations` here: Serve rebuilds the route signatures and needs
# real annotation objects (string ones would turn `request: Request` into a query field).
import logging
from http import HTTPStatus
from pathlib import Path

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.utils import is_body_allowed_for_status_code
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import SessionError
from deployments.routing import key_for, routed, slot_key
from deployments.schemas import (
    ControlRequest,
    ControlState,
    LAYOUT_KINDS,
    ErrorAnswer,
    SessionChanges,
    SessionCreated,
    SessionOptions,
    SessionShared,
    SessionState,
    allowed_values,
)

log = logging.getLogger("ray.serve")
PAGE = Path(__file__).with_name("page.html")  # the browser page: plain HTML and JS, no build step
MJPEG_BOUNDARY = "frame"
FRAME_WAIT_S = 10.0  # long-poll length for the next frame; the stream stays open across polls
DEFAULT_MAX_BODY_BYTES = 65536  # config serve.max_body_bytes
SHOWN_CHARS = 64  # of an input an error answer repeats; a longer one is cut to this
RETRY_AFTER_S = 5  # when no session can start now

api = FastAPI(
    title="dwm-serve",
    description=(
        "Interactive driving sessions: each has its own ego car in a shared simulated world, its own "
        "denoising queue and its own live video. Create a session, drive it with controls, watch its "
        "MJPEG stream (or its RTSP path when the server pushes to one)."
    ),
    version="0.1.0",
)

_ALLOWED = allowed_values()

# The error answers in OpenAPI: every one has the shape of ErrorAnswer.
_MEANINGS = {
    400: "the body could not be read",
    401: "no token: send `Authorization: Bearer <token>`",
    403: "the token is not this session's (or is a viewer's where the driver's is needed); or something this server "
         "does not offer, e.g. recording",
    404: "no such driving session",
    409: "nothing to give yet: the message says what to do first",
    413: "the request body is larger than config serve.max_body_bytes",
    415: "a body not sent as `Content-Type: application/json`",
    429: "no room for another session now (config serve.max_sessions); try again after Retry-After seconds",
    422: "a value out of range, of the wrong type or unknown; the message says what is allowed",
    503: "cannot be served now; the message says why",
}


def _errors(*codes: int, by_ref: bool = False) -> dict:
    """A route's `responses` for the error answers it gives. by_ref: for a route whose own
    answer is not JSON (FastAPI would declare its errors in that media type); the schema is
    then referred to, declared by the other routes."""
    if by_ref:
        content = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}}
        return {code: {"description": _MEANINGS[code], "content": content} for code in codes}
    return {code: {"model": ErrorAnswer, "description": _MEANINGS[code]} for code in codes}


def _links(token: str, *operations: str) -> dict:
    """OpenAPI links from an answer carrying a session's `id` and a `token` to the operations on
    that session (so a generated client, or a fuzzer, can follow them). token: how the
    operations take it, "header" (`Authorization: Bearer`) or "query" (`?token=`)."""
    where = {"header": ("header.authorization", "Bearer {$response.body#/token}"),
             "query": ("query.token", "$response.body#/token")}[token]
    return {
        op: {
            "operationId": op,
            "parameters": {"session_id": "$response.body#/id", where[0]: where[1]},
            "description": f"`{op}` of the session in this answer, with its token",
        }
        for op in operations
    }


def _short(text: str) -> str:
    """`text`, cut to its first SHOWN_CHARS characters and its length when longer: an answer
    never repeats a long input back."""
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}...({len(text)} chars)"


def _item(loc: list, msg: str, type_: str) -> dict:
    return {"loc": loc, "msg": msg, "type": type_}


@api.exception_handler(RequestValidationError)
async def _explain_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose every message says what the field allows (and repeats no more than the start
    of a long input)."""
    details = []
    for err in exc.errors():
        where = [_short(part) if isinstance(part, str) else part for part in err.get("loc", ())]
        loc = [str(part) for part in where if part != "body"]
        field = loc[-1] if loc else "body"
        if err.get("type") == "extra_forbidden":
            fields = ", ".join(n for n in _fields_of(request))
            msg = f"unknown field {field!r}; allowed fields: {fields}"
        elif field in _ALLOWED:
            shown = _short(repr(err.get("input")))
            msg = f"{field}={shown}: {err.get('msg', 'invalid')}; allowed: {_ALLOWED[field]}"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}"
        details.append(_item(where, msg, err.get("type")))
    return JSONResponse(status_code=422, content={"detail": details})


@api.exception_handler(StarletteHTTPException)
async def _refused(request: Request, exc: StarletteHTTPException) -> Response:
    """Every other error answer in the same shape, `{"detail": [{"loc", "msg", "type"}]}`,
    Starlette's own too (404 for a path that is not there, 405)."""
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route of the path only (GET and
        # POST /sessions are two routes): name every method the path answers.
        allowed = _methods_of(request.scope)
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        exc = StarletteHTTPException(405, f"{request.method} is not answered here; allowed: {', '.join(allowed)}")
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=headers)
    detail = exc.detail
    if not isinstance(detail, list):
        kind = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        detail = [_item([], str(detail), kind)]
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _methods_of(scope: Scope) -> list[str]:
    """The methods some route answers at the request's path, in a fixed order (asked of the
    router as it routes, so routes of included routers count too)."""
    return [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if any(route.matches({**scope, "method": m})[0] == Match.FULL for route in api.router.routes)]


class BodyTooLarge(HTTPException):
    """413. An HTTPException, so that FastAPI's reading of a body passes it on as it is (it
    turns any other error while reading into a 400)."""

    def __init__(self, limit: int):
        msg = f"the request body is larger than this server takes: at most {limit} bytes (config serve.max_body_bytes)"
        super().__init__(413, [_item(["body"], msg, "body_too_large")])


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused with 413 before anything
    parses it: by its Content-Length before a byte of it is read, or, sent chunked, as soon
    as the bytes received pass the limit."""

    max_bytes = DEFAULT_MAX_BODY_BYTES  # set by Ingress.__init__: one Ingress per replica process

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        length = Headers(scope=scope).get("content-length", "").strip()
        if length.isascii() and length.isdigit() and int(length) > limit:
            await _answer(BodyTooLarge(limit))(scope, receive, send)
            return
        received, started = 0, False

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def send_noted(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_counted, send_noted)
        except BodyTooLarge as err:  # read outside a route (which answers it itself)
            if started:
                raise
            await _answer(err)(scope, receive, send)


def _answer(exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


api.add_middleware(BodyLimit)


class AllowedHosts(TrustedHostMiddleware):
    """Starlette's Host header check: a request naming another host is refused with 400, so a
    web page on another site whose name is made to resolve to this machine (DNS rebinding)
    cannot drive it. Host names from config serve.allowed_hosts and serve.http_host."""

    hosts: list[str] = ["*"]  # set by Ingress.__init__: one Ingress per replica process

    def __init__(self, app: ASGIApp):
        super().__init__(app, allowed_hosts=self.hosts)


api.add_middleware(AllowedHosts)


async def _json_body(request: Request) -> None:
    """415 for a body not sent as JSON (FastAPI would take it as bytes and answer 422). A web
    page of any site can POST a text/plain body without the browser asking first (no CORS
    preflight): such a body is never read as a request. No body at all is fine."""
    if not await request.body():  # read already, within the limit, by FastAPI
        return
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    if kind == "application" and (subtype == "json" or subtype.endswith("+json")):
        return
    got = f"it came as {_short(repr(content_type))}" if content_type else "it came without a Content-Type"
    msg = f"the body must be JSON, sent with `Content-Type: application/json`; {got}"
    raise HTTPException(415, [_item(["header", "content-type"], msg, "unsupported_media_type")])


def _fields_of(request: Request) -> list[str]:
    model = ControlRequest if request.url.path.endswith("/control") else SessionOptions
    return list(model.model_fields)


# The session's token, as FastAPI's bearer scheme: /docs shows it and lets a user authorize.
# Not an automatic 401: where no token is needed (start, list) none is asked, and the session
# manager says which token an operation wants.
BEARER = HTTPBearer(
    auto_error=False, scheme_name="SessionToken", bearerFormat="opaque",
    description="the token `POST /sessions` answers (the driver's) or `POST /sessions/{id}/share` answers (a viewer's)",
)
TOKEN_HEADER = Security(BEARER)
# Where `?token=` (or public viewing) does as well, the header is one way among others: FastAPI
# declares the scheme, this adds "or none" to the operation's security (FastAPI appends lists).
HEADER_OR_QUERY = {"security": [{}]}


def _bearer(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    token = credentials.credentials.strip() if credentials else ""
    return token or None


# Where a session is seen (state, video, layout), the token may come in the URL too: players
# (ffplay, VLC) and an <img> cannot send a header.
TOKEN_QUERY = Query(None, max_length=256, description="the driver's or a viewer's token, for clients that cannot "
                    "send `Authorization: Bearer <token>` (the header wins when both are given)")


def _seeing(credentials: HTTPAuthorizationCredentials | None, token: str | None) -> str | None:
    return _bearer(credentials) or token or None


@serve.deployment(name="Ingress", max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, sessions: DeploymentHandle, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 allowed_hosts: list[str] | None = None, owners: int = 1):
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
            raise ValueError(f"serve.max_body_bytes={max_body_bytes!r}: must be a whole number >= 1")
        BodyLimit.max_bytes = max_body_bytes
        AllowedHosts.hosts = list(allowed_hosts) if allowed_hosts else ["*"]
        self.sessions = sessions
        self.owners = owners
        self.page_html = PAGE.read_text()

    async def _call(self, method: str, *args, key: str | None = None):
        """Call the SessionManager that owns the session named first in `args` (or the one
        `key` routes to); a refusal (SessionError) becomes an HTTP answer with its reason."""
        try:
            result = await getattr(routed(self.sessions, key_for(args[0]) if key is None else key), method).remote(*args)
        except Exception as err:  # the session manager died in the call: answer, do not crash
            log.warning("the session manager failed on %s: %s", method, err)
            raise HTTPException(503, [_item([], "the session manager did not answer (it is being restarted); "
                                             "try again in a few seconds", "session_manager_unavailable")]) from None
        if isinstance(result, SessionError):
            headers = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": str(RETRY_AFTER_S)}}.get(result.status)
            raise HTTPException(result.status, result.detail(), headers=headers)
        return result

    @staticmethod
    def _absolute(request: Request, streams: dict) -> dict:
        base = str(request.base_url).rstrip("/")
        return {**streams, "mjpeg": base + streams["mjpeg"]}

    @api.get("/", response_class=HTMLResponse, summary="The browser page: start a session, watch it, drive it",
             responses=_errors(413, by_ref=True), operation_id="page")
    async def page(self):
        return HTMLResponse(self.page_html)

    @api.post(
        "/sessions", status_code=201, response_model=SessionCreated, summary="Start a driving session",
        responses={201: {"links": _links("header", "get_session", "control_session", "share_session",
                                         "session_layout", "change_session", "session_recording", "end_session")},
                   **_errors(400, 403, 413, 415, 422, 429, 503)},
        dependencies=[Depends(_json_body)], operation_id="start_session",
    )
    async def create_session(self, request: Request, options: SessionOptions | None = Body(None)):
        # To the session owner with the fewest sessions; one that is full (its load report was
        # old) hands it to the others in turn.
        wanted = (options or SessionOptions()).model_dump()
        keys = [""] + ([slot_key(k) for k in range(self.owners)] if self.owners > 1 else [])
        full = None
        for key in keys:
            try:
                created = await self._call("create", wanted, key=key)
                break
            except HTTPException as err:
                if err.status_code != 429:
                    raise
                full = full or err
        else:
            raise full
        return {**created, "streams": self._absolute(request, created["streams"])}

    @api.get("/sessions", response_model=list[SessionState], responses=_errors(413, 422, 503),
             operation_id="list_sessions", openapi_extra=HEADER_OR_QUERY,
             summary="The driving sessions the token given may see (all of them with serve.public_viewing)")
    async def list_sessions(self, request: Request, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER,
                            token: str | None = TOKEN_QUERY):
        seeing = _seeing(authorization, token)
        # One owner after the other: calls made at once from one request share its request
        # id, which Serve's router matches them by (`deployments.routing`).
        parts = [await self._call("list", seeing, key=slot_key(k)) for k in range(self.owners)]
        states = list({s["id"]: s for part in parts for s in part}.values())  # an owner asked twice counts once
        return [{**s, "streams": self._absolute(request, s["streams"])} for s in states]

    @api.get(
        "/sessions/{session_id}", response_model=SessionState, summary="A session's state and stats",
        responses=_errors(401, 403, 404, 413, 422, 503), operation_id="get_session", openapi_extra=HEADER_OR_QUERY,
    )
    async def get_session(self, session_id: str, request: Request, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER,
                          token: str | None = TOKEN_QUERY):
        state = await self._call("get", session_id, _seeing(authorization, token))
        return {**state, "streams": self._absolute(request, state["streams"])}

    @api.post(
        "/sessions/{session_id}/share", response_model=SessionShared, status_code=201,
        summary="A read-only viewer token for the session, and its stream URLs with it (the driver only)",
        responses={201: {"links": _links("query", "get_session", "session_layout")},
                   **_errors(401, 403, 404, 413, 422, 503)},
        operation_id="share_session",
    )
    async def share(self, session_id: str, request: Request, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER):
        shared = await self._call("share", session_id, _bearer(authorization))
        return {**shared, "streams": self._absolute(request, shared["streams"])}

    @api.post(
        "/sessions/{session_id}/control", response_model=ControlState, summary="Drive: merge into the sticky control",
        responses=_errors(400, 401, 403, 404, 413, 415, 422, 503), dependencies=[Depends(_json_body)],
        operation_id="control_session",
    )
    async def control(self, session_id: str, changes: ControlRequest, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER):
        return await self._call("control", session_id, _bearer(authorization), changes.model_dump(exclude_none=True))

    @api.patch(
        "/sessions/{session_id}", response_model=SessionState,
        summary="Change a running session: the layout overlay, MP4 recording on or off (the driver only)",
        responses=_errors(400, 401, 403, 404, 413, 415, 422, 503), dependencies=[Depends(_json_body)],
        operation_id="change_session",
    )
    async def change_session(self, session_id: str, changes: SessionChanges, request: Request,
                             authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER):
        state = await self._call("change", session_id, _bearer(authorization), changes.model_dump(exclude_none=True))
        return {**state, "streams": self._absolute(request, state["streams"])}

    @api.get(
        "/sessions/{session_id}/recording.mp4",
        summary="Download the session's newest finished MP4 recording",
        response_class=Response,
        responses={200: {"content": {"video/mp4": {}}}, **_errors(401, 403, 404, 409, 413, 422, 503, by_ref=True)},
        operation_id="session_recording", openapi_extra=HEADER_OR_QUERY,
    )
    async def recording(self, session_id: str, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER,
                        token: str | None = TOKEN_QUERY):
        name, data = await self._call("recording", session_id, _seeing(authorization, token))
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": f'attachment; filename="{name}"', "Cache-Control": "no-store"})

    @api.delete(
        "/sessions/{session_id}",
        response_model=SessionState,
        summary="End a session: frees its car, queue and stream; answers its final state",
        responses=_errors(401, 403, 404, 413, 422, 503), operation_id="end_session",
    )
    async def delete_session(self, session_id: str, request: Request, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER):
        state = await self._call("delete", session_id, _bearer(authorization))
        return {**state, "streams": self._absolute(request, state["streams"])}

    @api.get(
        "/sessions/{session_id}/video.mjpg",
        summary="The session's live video: multipart/x-mixed-replace JPEG frames",
        response_class=StreamingResponse,
        responses=_errors(401, 403, 404, 413, 422, 503), operation_id="session_video", openapi_extra=HEADER_OR_QUERY,
    )
    async def video(self, session_id: str, authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER, token: str | None = TOKEN_QUERY):
        await self._call("get", session_id, _seeing(authorization, token))  # 404 or 401/403 before the stream

        async def parts():
            after = -1
            while True:
                try:
                    frame = await routed(self.sessions, key_for(session_id)).next_frame.remote(session_id, after, FRAME_WAIT_S)
                except Exception:  # the session manager died: the stream ends, cleanly
                    return
                if isinstance(frame, SessionError):
                    return  # the session ended: so does its stream
                if frame is None:
                    continue
                after = frame.index
                yield (
                    f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n"
                    f"X-Frame-Index: {frame.index}\r\nX-Sim-Time: {frame.sim_time:.3f}\r\nX-Control-Seq: {frame.control_seq}\r\n\r\n"
                ).encode() + frame.jpeg + b"\r\n"

        return StreamingResponse(
            parts(),
            media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
            headers={"Cache-Control": "no-store"},
        )

    @api.get(
        "/pipelines", summary="Where the model runs: pipelines, their sessions, each stage's GPU and node",
        responses=_errors(413, 503), operation_id="pipelines",
    )
    async def pipelines(self):
        return await self._call("pipelines", key=slot_key(0))

    @api.get(
        "/sessions/{session_id}/layout.png",
        summary="The newest conditions' layout images side by side (what the model is asked to draw)",
        responses={
            200: {"content": {"image/png": {}}}, 204: {"description": "no conditions yet"},
            **_errors(401, 403, 404, 413, 422, 503),
        },
        operation_id="session_layout", openapi_extra=HEADER_OR_QUERY,
    )
    # kind is checked after the session (an unknown session is 404 whatever its kind), so the
    # enum is the schema's only: FastAPI would refuse a bad kind before the route runs.
    async def layout(self, session_id: str,
                     kind: str = Query("both", description="map, boxes or both",
                                       json_schema_extra={"enum": list(LAYOUT_KINDS)}),
                     authorization: HTTPAuthorizationCredentials | None = TOKEN_HEADER, token: str | None = TOKEN_QUERY):
        png = await self._call("layout_png", session_id, kind, _seeing(authorization, token))
        if png is None:
            return Response(status_code=204)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

