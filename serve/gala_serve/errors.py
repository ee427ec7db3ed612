"""Request errors that become 4xx JSON answers; the message names what is wrong."""

from __future__ import annotations


class RequestError(ValueError):
    status = 400


class TooLarge(RequestError):
    status = 413


class NotFound(RequestError):
    status = 404


class LengthRequired(RequestError):
    status = 411
