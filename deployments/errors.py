"""Errors the session manager answers with; the ingress turns each into its HTTP status.

They are returned across the actor boundary as values, not raised (see `refusals`): Serve
logs every exception a replica raises with its traceback, and a wrong token or an unknown
session is an answer, not a failure of the server.
"""

from __future__ import annotations

import functools
import inspect


class SessionError(Exception):
    """A request about a session that cannot be served; `status` is its HTTP status."""

    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # crosses Ray as the same class with the same message
        return (type(self), (self.message,))


class SessionNotFound(SessionError):
    status = 404


class MissingToken(SessionError):
    status = 401


class WrongToken(SessionError):
    status = 403


class InvalidRequest(SessionError):
    status = 422


class SessionLimit(SessionError):
    status = 503


class WorldGone(SessionError):
    """The world's simulator cannot be reached now (it is being reconnected)."""

    status = 503


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
