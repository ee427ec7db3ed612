"""Request errors that become 4xx answers (gRPC: the matching status code); the message names
what is wrong. 503s say when to come back (``retry_after``, HTTP ``Retry-After``) where a retry
can help."""

from __future__ import annotations


class RequestError(ValueError):
    status = 400
    retry_after: int | None = None  # seconds, for the Retry-After header


class TooLarge(RequestError):
    status = 413


class NotFound(RequestError):
    status = 404


class NotReady(RequestError):
    status = 503


class Loading(NotReady):
    retry_after = 1


class Overloaded(NotReady):
    """The batcher's queue is full: shed at once rather than queued without end."""

    retry_after = 1


class ServerFault(RuntimeError):
    """A fault of the server (HTTP 500, gRPC INTERNAL) whose message is safe to show the client:
    it names what failed, and the server keeps serving."""
