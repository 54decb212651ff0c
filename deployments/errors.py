"""Errors the session manager answers with; the ingress turns each into its HTTP status.

They are returned across the actor boundary as values, not raised (see `refusals`): Serve
logs every exception a replica raises with its traceback, and a wrong token or an unknown
session is an answer, not a failure of the server.
"""

from __future__ import annotations

import functools
import inspect


class SessionError(Exception):
    """A request about a session that cannot be served; `status` is its HTTP status, `loc`
    the part of the request it is about (as in FastAPI's 422 answers) and `type` its kind."""

    status = 400
    loc: tuple[str, ...] = ()
    type = "bad_request"

    def __init__(self, message: str, loc: tuple[str, ...] | None = None):
        super().__init__(message)
        self.message = message
        if loc is not None:
            self.loc = tuple(loc)

    def __reduce__(self):  # crosses Ray as the same class with the same message and loc
        return (type(self), (self.message, self.loc))

    def detail(self) -> list[dict]:
        """The answer's `detail`: the list shape of every error answer of the API."""
        return [{"loc": list(self.loc), "msg": self.message, "type": self.type}]


class SessionNotFound(SessionError):
    status = 404
    loc = ("path", "session_id")
    type = "session_not_found"


class SessionLost(SessionNotFound):
    """A session that was started and never ended is gone: the session manager that held it
    died and a new one took its place (the Ingress remembers the sessions it started)."""

    type = "session_lost"


class MissingToken(SessionError):
    status = 401
    loc = ("header", "authorization")
    type = "missing_token"


class WrongToken(SessionError):
    status = 403
    loc = ("header", "authorization")
    type = "wrong_token"


class InvalidRequest(SessionError):
    status = 422
    loc = ("body",)
    type = "invalid_request"


class NotOffered(SessionError):
    """A valid request for something this server is configured not to do (recording without
    serve.record_dir): refused as not allowed here, not as bad input."""

    status = 403
    loc = ("body",)
    type = "not_offered"


class NothingRecorded(SessionError):
    """A recording asked for before any has been finished."""

    status = 409
    loc = ("path", "session_id")
    type = "nothing_recorded"


class SessionLimit(SessionError):
    """No room for another session now (serve.max_sessions, or no free place for a car): a
    limit the client meets, not a failure of the server; answered with Retry-After."""

    status = 429
    type = "session_limit"


class WorldGone(SessionError):
    """The world's simulator cannot be reached now (it is being reconnected)."""

    status = 503
    type = "world_unavailable"


def refusals(method):
    """Decorator for SessionManager methods: a SessionError raised inside is returned as the
    method's result, for the caller to turn into an HTTP answer."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def answer(*args, **kwargs):
            try:
                return await method(*args, **kwargs)
            except SessionError as err:
                return err

        return answer

    @functools.wraps(method)
    def answer_sync(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except SessionError as err:
            return err

    return answer_sync
