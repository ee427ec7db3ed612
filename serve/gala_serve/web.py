"""The HTTP front: an ASGI app over the Open Inference Protocol codec, served by uvicorn.

HTTP framing is uvicorn's and httptools' (llhttp, Node.js's parser): it refuses a duplicate or
conflicting ``Content-Length``, ``Content-Length`` beside ``Transfer-Encoding``, and a
``Transfer-Encoding`` whose last coding is not ``chunked``, with a 400 and a closed connection.
:class:`Protocol` adds what uvicorn leaves to a proxy in front of it:

- a deadline from a request's first byte to its last (``--request-timeout``): a client that
  stalls in its head or body gets a 408 and the connection closes; a connection that sends
  nothing at all is closed after the same time;
- a cap on open connections (``--max-connections``): the connection over it is answered 503
  and closed at once;
- a bound on the request head (:data:`HEAD_LIMIT`, 431).

The app enforces ``--max-body-bytes`` from ``Content-Length`` before reading a byte of the body
(chunked bodies: as they arrive), type-checks every field (400 naming it) and answers 500 only
for a fault of the server, logged with the request id.

uvicorn has no public hook for the first two: its ``limit_concurrency`` answers a bare
"Service Unavailable" only once a request head is in, and its only timeout is the keep-alive
one, between requests. So :class:`Protocol` subclasses uvicorn's ``HttpToolsProtocol`` and
relies on names that uvicorn does not promise to keep. uvicorn is pinned exactly in
serve/pyproject.toml (:data:`UVICORN_VERSION`), and :func:`uvicorn_mismatches`, run before the
server starts, checks each of those names: a uvicorn that renamed one does not serve with the
protections silently off, it refuses to start and names what moved.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
import uuid
from urllib.parse import parse_qs

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gala_serve import protocol
from gala_serve.errors import Loading, NotFound, RequestError, ServerFault, TooLarge
from gala_serve.metrics import CONTENT_TYPE as METRICS_TYPE

HEAD_LIMIT = 64 << 10  # request line and headers
DRAIN_FACTOR = 4
LINGER_S = 1.0
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


def _status_reply(status: int, message: str) -> bytes:
    body = orjson.dumps({"error": message})
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request deadline, a connection cap and a head bound.

    The settings come from the config object (``gala_request_timeout``, ``gala_max_connections``
    and ``gala_on_timeout``), which uvicorn hands every connection."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.deadline: asyncio.TimerHandle | None = None
        # Head bytes as parsed (URL and headers) and as received while the head is unfinished.
        self.head_bytes = self.head_raw = 0
        self.in_head = self.eof = self.refused = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.config.gala_max_connections:
            self._refuse(503, f"more than {self.config.gala_max_connections} open connections")
            return
        self._arm()  # a connection that never sends a request is cut too

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            if self.head_bytes > HEAD_LIMIT:  # raised by on_url or on_header
                self._refuse(431, f"request line and headers exceed {HEAD_LIMIT} bytes")
            else:
                self._refuse(400, f"malformed HTTP request: {err}")
            return
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served")
            return
        if self.in_head:  # a head still unfinished: every byte of this read belongs to it
            self.head_raw += len(data)
            if self.head_raw > HEAD_LIMIT:
                self._refuse(431, f"request line and headers exceed {HEAD_LIMIT} bytes")

    def eof_received(self) -> bool:
        """A client that half-closes after its request still gets the answer; the connection
        closes once the answers to what it sent are out."""
        self.eof = True
        if self.refused or self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        return True  # keep the transport open for writing

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.eof and not self.pipeline:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > HEAD_LIMIT:
            raise ValueError("head too large")  # the parser stops; data_received answers 431

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = self.head_raw = 0
        self.in_head = True
        self._arm()

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(self.config.gala_request_timeout, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if not self.in_head and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # no request begun: nothing to answer
            return
        self.config.gala_on_timeout()
        seconds = self.config.gala_request_timeout
        self._refuse(408, f"the request did not arrive within {seconds:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` unless a response has begun, then end the connection: our side at
        once, and after :data:`LINGER_S` of dropping whatever the client still sends (closing
        at once would reset the connection, and a client still writing might lose the
        answer)."""
        self._disarm()
        cycle = self.cycle  # the last request's; it may be over (a keep-alive connection)
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_status_reply(status, message))
        if cycle is not None:
            cycle.response_started = cycle.response_complete = True
        self.refused = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


# The uvicorn whose private HttpToolsProtocol names Protocol relies on (serve/pyproject.toml pins
# it; a test holds the two equal).
UVICORN_VERSION = "0.54.0"
# Methods Protocol overrides or calls. The on_* parser callbacks are httptools' names, called on
# the protocol because uvicorn hands it to the parser; on_response_complete is uvicorn's own.
PRIVATE_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "eof_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_message_complete",
    "on_response_complete",
    "_unset_keepalive_if_required",
)
# Attributes set in HttpToolsProtocol.__init__ and RequestResponseCycle.__init__ that Protocol
# reads or writes.
PROTOCOL_ATTRIBUTES = ("config", "loop", "parser", "connections", "transport", "pipeline", "cycle")
CYCLE_ATTRIBUTES = ("response_started", "response_complete")


class UvicornMismatch(RuntimeError):
    """The installed uvicorn lacks a private name that :class:`Protocol` relies on."""


def uvicorn_mismatches() -> list[str]:
    """The private uvicorn names :class:`Protocol` relies on that the installed uvicorn does not
    have where it had them (empty: all in place). Attributes are looked up among the names the
    constructors assign (their code objects' ``co_names``), so no connection is needed."""
    missing = [
        f"HttpToolsProtocol.{name}()"
        for name in PRIVATE_METHODS
        if not callable(getattr(HttpToolsProtocol, name, None))
    ]
    for cls, names in (
        (HttpToolsProtocol, PROTOCOL_ATTRIBUTES),
        (RequestResponseCycle, CYCLE_ATTRIBUTES),
    ):
        code = getattr(cls.__init__, "__code__", None)
        assigned = set(code.co_names) if code is not None else set()
        missing += [f"{cls.__name__}.{name}" for name in names if name not in assigned]
    # uvicorn hands each request cycle this bound method; a rename would leave ours uncalled.
    hooks = getattr(HttpToolsProtocol.on_headers_complete, "__code__", None)
    if hooks is None or "on_response_complete" not in hooks.co_names:
        missing.append("HttpToolsProtocol.on_headers_complete() -> on_response_complete")
    missing += [f"STATUS_LINE[{s}]" for s in (400, 408, 431, 503) if s not in STATUS_LINE]
    return missing


def check_uvicorn() -> None:
    """:class:`UvicornMismatch` naming what moved, if anything did; a warning when the version
    is not the pinned one but every name is in place."""
    missing = uvicorn_mismatches()
    if missing:
        raise UvicornMismatch(
            f"uvicorn {uvicorn.__version__} lacks what the request deadline and the connection "
            f"cap rely on: {', '.join(missing)}. Install uvicorn=={UVICORN_VERSION} "
            "(serve/pyproject.toml pins it), or port gala_serve.web.Protocol to this version"
        )
    if uvicorn.__version__ != UVICORN_VERSION:
        log.warning(
            "uvicorn %s is not %s, the version gala_serve.web.Protocol was written against; "
            "the private names it relies on are all in place",
            uvicorn.__version__,
            UVICORN_VERSION,
        )


def server(service) -> uvicorn.Server:
    """A uvicorn server for ``service`` (``serve(sockets=[...])`` starts it);
    :class:`UvicornMismatch` when the installed uvicorn cannot carry :class:`Protocol`."""
    check_uvicorn()
    a = service.args
    config = uvicorn.Config(
        App(service),
        http=Protocol,
        loop="asyncio",
        lifespan="off",
        timeout_keep_alive=a.idle_timeout,
        timeout_graceful_shutdown=5,
        access_log=a.access_log,
        log_level="info" if a.access_log else "warning",
        server_header=False,
        date_header=True,
        headers=[("server", f"gala-serve/{service.server_metadata()['version']}")],
    )
    config.gala_request_timeout = a.request_timeout
    config.gala_max_connections = a.max_connections
    config.gala_on_timeout = service.metrics.timeouts.inc
    return uvicorn.Server(config)
