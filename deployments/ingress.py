"""The HTTP API (FastAPI; OpenAPI at /docs). Stateless: the sessions live in the SessionManager."""

# No `from __future__ import annotations` here: Serve rebuilds the route signatures and needs
# real annotation objects (string ones would turn `request: Request` into a query field).
from pathlib import Path

from fastapi import Body, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.errors import SessionError
from deployments.schemas import (
    ControlRequest,
    ControlState,
    SessionCreated,
    SessionOptions,
    SessionState,
    allowed_values,
)

PAGE = Path(__file__).with_name("page.html")  # the browser page: plain HTML and JS, no build step
MJPEG_BOUNDARY = "frame"
FRAME_WAIT_S = 10.0  # long-poll length for the next frame; the stream stays open across polls

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


@api.exception_handler(RequestValidationError)
async def _explain_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 whose every message says what the field allows."""
    details = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        field = loc[-1] if loc else "body"
        if err.get("type") == "extra_forbidden":
            fields = ", ".join(n for n in _fields_of(request))
            msg = f"unknown field {field!r}; allowed fields: {fields}"
        elif field in _ALLOWED:
            msg = f"{field}={err.get('input')!r}: {err.get('msg', 'invalid')}; allowed: {_ALLOWED[field]}"
        else:
            msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}"
        details.append({"loc": list(err.get("loc", ())), "msg": msg, "type": err.get("type")})
    return JSONResponse(status_code=422, content={"detail": details})


def _fields_of(request: Request) -> list[str]:
    model = ControlRequest if request.url.path.endswith("/control") else SessionOptions
    return list(model.model_fields)


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@serve.deployment(name="Ingress", max_ongoing_requests=1000)
@serve.ingress(api)
class Ingress:
    def __init__(self, sessions: DeploymentHandle):
        self.sessions = sessions
        self.page_html = PAGE.read_text()

    async def _call(self, method: str, *args):
        """Call the SessionManager; a refusal (SessionError) becomes an HTTP answer with its reason."""
        result = await getattr(self.sessions, method).remote(*args)
        if isinstance(result, SessionError):
            headers = {"WWW-Authenticate": "Bearer"} if result.status == 401 else None
            raise HTTPException(result.status, result.message, headers=headers)
        return result

    @staticmethod
    def _absolute(request: Request, streams: dict) -> dict:
        base = str(request.base_url).rstrip("/")
        return {**streams, "mjpeg": base + streams["mjpeg"]}

    @api.get("/", response_class=HTMLResponse, summary="The browser page: start a session, watch it, drive it")
    async def page(self):
        return HTMLResponse(self.page_html)

    @api.post("/sessions", status_code=201, response_model=SessionCreated, summary="Start a driving session")
    async def create_session(self, request: Request, options: SessionOptions | None = Body(None)):
        created = await self._call("create", (options or SessionOptions()).model_dump())
        return {**created, "streams": self._absolute(request, created["streams"])}

    @api.get("/sessions", response_model=list[SessionState], summary="All driving sessions")
    async def list_sessions(self, request: Request):
        states = await self._call("list")
        return [{**s, "streams": self._absolute(request, s["streams"])} for s in states]

    @api.get("/sessions/{session_id}", response_model=SessionState, summary="A session's state and stats")
    async def get_session(self, session_id: str, request: Request):
        state = await self._call("get", session_id)
        return {**state, "streams": self._absolute(request, state["streams"])}

    @api.post("/sessions/{session_id}/control", response_model=ControlState, summary="Drive: merge into the sticky control")
    async def control(self, session_id: str, changes: ControlRequest, authorization: str | None = Header(None)):
        return await self._call("control", session_id, _bearer(authorization), changes.model_dump(exclude_none=True))

    @api.delete(
        "/sessions/{session_id}",
        response_model=SessionState,
        summary="End a session: frees its car, queue and stream; answers its final state",
    )
    async def delete_session(self, session_id: str, request: Request, authorization: str | None = Header(None)):
        state = await self._call("delete", session_id, _bearer(authorization))
        return {**state, "streams": self._absolute(request, state["streams"])}

    @api.get(
        "/sessions/{session_id}/video.mjpg",
        summary="The session's live video: multipart/x-mixed-replace JPEG frames",
        response_class=StreamingResponse,
    )
    async def video(self, session_id: str):
        await self._call("get", session_id)  # 404 before the stream starts

        async def parts():
            after = -1
            while True:
                frame = await self.sessions.next_frame.remote(session_id, after, FRAME_WAIT_S)
                if isinstance(frame, SessionError):
                    return  # the session ended: so does its stream
                if frame is None:
                    continue
                after = frame.index
                yield (
                    f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(frame.jpeg)}\r\n"
                    f"X-Frame-Index: {frame.index}\r\nX-Sim-Time: {frame.sim_time:.3f}\r\n\r\n"
                ).encode() + frame.jpeg + b"\r\n"

        return StreamingResponse(
            parts(),
            media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
            headers={"Cache-Control": "no-store"},
        )

    @api.get("/pipelines", summary="Where the model runs: pipelines, their sessions, each stage's GPU and node")
    async def pipelines(self):
        return await self._call("pipelines")

    @api.get(
        "/sessions/{session_id}/layout.png",
        summary="The newest conditions' layout images side by side (what the model is asked to draw)",
        responses={200: {"content": {"image/png": {}}}, 204: {"description": "no conditions yet"}},
    )
    async def layout(self, session_id: str, kind: str = Query("both", description="map, boxes or both")):
        png = await self._call("layout_png", session_id, kind)
        if png is None:
            return Response(status_code=204)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

