"""Request errors that become 4xx answers (gRPC: the matching status code); the message names
what is wrong."""

from __future__ import annotations


class RequestError(ValueError):
    status = 400


class TooLarge(RequestError):
    status = 413


class NotFound(RequestError):
    status = 404


class NotReady(RequestError):
    status = 503
