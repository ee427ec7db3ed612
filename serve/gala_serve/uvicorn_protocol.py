"""uvicorn's httptools protocol with what uvicorn leaves to a proxy in front of it, and the check
that the installed uvicorn still has the private names it relies on.

HTTP framing is uvicorn's and httptools' (llhttp, Node.js's parser): it refuses a duplicate or
conflicting ``Content-Length``, ``Content-Length`` beside ``Transfer-Encoding``, and a
``Transfer-Encoding`` whose last coding is not ``chunked``, with a 400 and a closed connection.
:class:`Protocol` adds:

- a deadline from a request's first byte to its last (``--request-timeout``): a client that
  stalls in its head or body gets a 408 and the connection closes; a connection that sends
  nothing at all is closed after the same time;
- a cap on open connections (``--max-connections``): the connection over it is answered 503
  and closed at once;
- a bound on the request head (:data:`HEAD_LIMIT`, 431).

uvicorn has no public hook for the first two: its ``limit_concurrency`` answers a bare
"Service Unavailable" only once a request head is in, and its only timeout is the keep-alive
one, between requests. So :class:`Protocol` subclasses uvicorn's ``HttpToolsProtocol`` and
relies on names that uvicorn does not promise to keep. uvicorn is pinned exactly in
serve/pyproject.toml (:data:`UVICORN_VERSION`), and :func:`uvicorn_mismatches`, run before the
server starts (:func:`server`), checks each of those names: a uvicorn that renamed one does not
serve with the protections silently off, it refuses to start and names what moved.
"""

from __future__ import annotations

import asyncio
import logging

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gala_serve.web import App

HEAD_LIMIT = 64 << 10  # request line and headers
LINGER_S = 1.0
log = logging.getLogger("gala_serve")


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
            f"cap rely on: {', '.join(missing)}. Install uvicorn=={UVICORN_VERSION} (serve/"
            "pyproject.toml pins it), or port gala_serve.uvicorn_protocol.Protocol to this version"
        )
    if uvicorn.__version__ != UVICORN_VERSION:
        log.warning(
            "uvicorn %s is not %s, the version gala_serve.uvicorn_protocol.Protocol was written "
            "against; the private names it relies on are all in place",
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
