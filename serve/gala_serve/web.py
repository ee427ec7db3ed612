"""The HTTP front: an ASGI app over the Open Inference Protocol codec, served by uvicorn through
:class:`gala_serve.uvicorn_protocol.Protocol` (the request deadline, the connection cap and the
head bound, which uvicorn leaves to a proxy).

The app enforces ``--max-body-bytes`` from ``Content-Length`` before reading a byte of the body
(chunked bodies: as they arrive), type-checks every field (400 naming it) and answers 500 only
for a fault of the server, logged with the request id.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from urllib.parse import parse_qs

import orjson

from gala_serve import protocol
from gala_serve.errors import Loading, NotFound, RequestError, ServerFault, TooLarge
from gala_serve.metrics import CONTENT_TYPE as METRICS_TYPE

DRAIN_FACTOR = 4
# Bigger requests are parsed in the pool, off the event loop (answers: protocol.OFFLOAD_VALUES).
OFFLOAD_BYTES = 1 << 20
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?$")
JSON = b"application/json"
log = logging.getLogger("gala_serve")


class ClientGone(Exception):
    """The client disconnected (or was cut by the deadline) before its body was in."""


class BodyTooLarge(TooLarge):
    def __init__(self, message: str, drain: bool) -> None:
        super().__init__(message)
        self.drain = drain


class Reply:
    __slots__ = ("body", "close", "content_type", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON, headers=()):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers, self.close = list(headers), False


def json_reply(status: int, doc: dict) -> Reply:
    return Reply(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))


def error_reply(err: RequestError) -> Reply:
    """The 4xx (or 503) answer for a request: ``{"error": "<what is wrong>"}``, with
    ``Retry-After`` where a retry can help (loading, overloaded)."""
    reply = json_reply(err.status, {"error": str(err)})
    if err.retry_after is not None:
        reply.headers.append((b"retry-after", str(err.retry_after).encode()))
    return reply


class App:
    """The ASGI application: routing, body limits, the protocol codec, errors, metrics."""

    def __init__(self, service) -> None:
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        start, request_id = time.perf_counter(), uuid.uuid4().hex[:16]
        exchange = Exchange(self.service, scope, receive)
        try:
            exchange.headers = _headers(scope)
            request_id = exchange.headers.get("x-request-id", request_id)[:64]
            reply = await exchange.answer()
        except ClientGone:
            seconds = time.perf_counter() - start
            self.service.metrics.request(exchange.endpoint, "http", seconds, "gone")
            return
        except BodyTooLarge as err:
            reply = error_reply(err)
            # A body far over the limit is not read to its end: the connection closes. One up
            # to DRAIN_FACTOR times the limit is read and dropped by the parser, so the client
            # gets the 413 rather than a broken pipe, and the connection serves on.
            reply.close = err.drain is False
        except RequestError as err:
            reply = error_reply(err)
        except Exception as err:  # a fault of the server: 500, logged, and keep serving
            log.error(
                "request %s %s %s failed:\n%s",
                request_id,
                scope["method"],
                scope["path"][:200],
                traceback.format_exc(),
            )
            # A ServerFault names what failed (e.g. the batch and the stage); other exceptions
            # only by type, their text may carry internals.
            what = str(err) if isinstance(err, ServerFault) else type(err).__name__
            reply = json_reply(500, {"error": f"internal error ({what}); request id {request_id}"})
        code = None if reply.status < 400 else str(reply.status)
        self.service.metrics.request(exchange.endpoint, "http", time.perf_counter() - start, code)
        response_headers = [
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            (b"x-request-id", request_id.encode("latin-1", "replace")),
            *reply.headers,
        ]
        if reply.close:
            response_headers.append((b"connection", b"close"))
        start_message = {"type": "http.response.start", "status": reply.status}
        await send({**start_message, "headers": response_headers})
        await send({"type": "http.response.body", "body": reply.body})


def _headers(scope) -> dict[str, str]:
    """Header names (lower case) to values; a repeated framing header is refused here too."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1")
        if name in out and name in ("content-length", "transfer-encoding", protocol.HEADER.lower()):
            raise RequestError(f"header {name!r} appears twice")
        out[name] = raw_value.decode("latin-1")
    return out


class Exchange:
    """One HTTP request on its way to a :class:`Reply`; ``endpoint`` names its route (for the
    metrics) as soon as it is known, so an error raised later is counted there too."""

    def __init__(self, service, scope, receive) -> None:
        self.service, self.scope, self.receive = service, scope, receive
        self.method, self.path = scope["method"], scope["path"].rstrip("/") or "/"
        self.endpoint, self.headers = "other", {}  # the headers: set by the app once checked

    async def answer(self) -> Reply:
        self.endpoint, reply = await self._route()
        return reply

    async def _route(self) -> tuple[str, Reply]:
        method, path, svc = self.method, self.path, self.service
        if method in ("GET", "HEAD"):
            if path == "/v2/health/live":
                return "live", json_reply(200, {"live": True})
            if path == "/v2/health/ready":
                reason = svc.not_ready()
                if reason is None:
                    return "ready", json_reply(200, {"ready": True})
                return "ready", json_reply(503, {"ready": False, "reason": reason})
            if path == "/metrics":
                return "metrics", Reply(200, svc.metrics.render(), METRICS_TYPE.encode())
            if path == "/v2":
                return "server_metadata", json_reply(200, svc.server_metadata())
        if not svc.ready.is_set():
            raise Loading("the model is still loading")
        if method == "POST" and path == "/v1/classify":
            self.endpoint = "classify"
            return "classify", await self._classify()
        match = MODEL_ROUTE.match(path)
        if match is None:
            raise NotFound(f"no endpoint {method} {path[:200]}")
        svc.check_model(match.group(1))
        action = match.group(2)
        if method == "GET" and action is None:
            return "model_metadata", json_reply(200, svc.metadata())
        if method == "GET" and action == "/ready":
            reason, name = svc.not_ready(), svc.args.model_name
            if reason is None:
                return "model_ready", json_reply(200, {"name": name, "ready": True})
            return "model_ready", json_reply(503, {"name": name, "ready": False, "reason": reason})
        if method == "POST" and action == "/infer":
            self.endpoint = "infer"
            return "infer", await self._infer()
        raise NotFound(f"no endpoint {method} {path[:200]}")

    async def body(self) -> bytes:
        """The whole body, refused (413) from its ``Content-Length`` before a byte is read, or
        as soon as a chunked one passes the limit."""
        limit = self.service.args.max_body_bytes
        length = self.headers.get("content-length")
        if length is not None and int(length) > limit:  # llhttp let only digits through
            raise BodyTooLarge(
                f"request body of {length} bytes exceeds the limit of {limit}",
                drain=int(length) <= DRAIN_FACTOR * limit,
            )
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes", False)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _infer(self) -> Reply:
        svc, body = self.service, await self.body()
        header = self.headers.get(protocol.HEADER.lower())
        if header is not None and not (header.isascii() and header.isdigit() and len(header) < 19):
            raise RequestError(f"{protocol.HEADER} {header[:40]!r} is not a byte count")
        ticket = svc.ticket()
        try:
            length = None if header is None else int(header)
            # A long JSON body parses off the loop, which keeps serving.
            big = len(body) > OFFLOAD_BYTES
            request = await svc.offload(protocol.parse_request, body, length, big=big)
            outputs = await svc.infer(request, ticket)
        finally:
            ticket.withdraw()
        rows = len(next(iter(outputs.values())))
        body, header_length = await svc.offload(
            protocol.encode_response,
            svc.args.model_name,
            request,
            outputs,
            big=rows * svc.model.num_classes
            > protocol.OFFLOAD_VALUES,  # e.g. 8,142 classes as JSON
        )
        if header_length is None:
            return Reply(200, body)
        return Reply(
            200,
            body,
            b"application/octet-stream",
            [(protocol.HEADER.lower().encode(), str(header_length).encode())],
        )

    async def _classify(self) -> Reply:
        svc, query = self.service, parse_qs(self.scope["query_string"].decode("latin-1"))
        top_k = query.get("top_k", ["5"])[0]
        if not (top_k.isascii() and top_k.isdigit() and 0 < int(top_k) <= 1 << 20):
            raise RequestError(f"top_k must be a positive integer, got {top_k[:40]!r}")
        full = query.get("full", ["0"])[0] in ("1", "true")
        image = await self.body()
        ticket = svc.ticket()
        try:
            outputs = await svc.classify_images([image], ticket)
        finally:
            ticket.withdraw()
        answers = await svc.offload(svc.top_k, outputs, int(top_k), full, big=full)
        return json_reply(200, {"model_name": svc.args.model_name, "predictions": answers})
