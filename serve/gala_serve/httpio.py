"""A small HTTP/1.1 server on asyncio streams: keep-alive, Content-Length bodies, limits.

One event-loop thread reads and answers every connection. The threaded server this replaces
spent most of its time handing the GIL between handler threads (each finished batch woke up to
``--max-batch`` of them at once); here a finished batch wakes the loop once. Bodies must carry a
``Content-Length`` (no chunked uploads: 411); ``Expect: 100-continue`` is answered; a body over
the limit gets a 413 after it has been read and dropped (up to ``DRAIN_FACTOR`` times the limit;
far larger ones get the 413 and the connection is closed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from gala_serve.errors import LengthRequired, RequestError, TooLarge

HEAD_LIMIT = 64 << 10  # request line and headers
DRAIN_FACTOR = 4
CHUNK = 1 << 20


class BadHead(RequestError):
    """The request line or headers cannot be parsed: answered, then the connection closes."""


class HeadTooLarge(BadHead):
    status = 431


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]  # names lower-cased
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    max_body: int
    keep_alive: bool = field(init=False)  # HTTP/1.1 unless "Connection: close"; set false on errors
    path: str = field(init=False)
    query: dict[str, list[str]] = field(init=False)
    _body: bytes | None = None

    def __post_init__(self) -> None:
        url = urlsplit(self.target)
        self.path, self.query = url.path.rstrip("/") or "/", parse_qs(url.query)
        connection = self.header("connection", "").lower()
        self.keep_alive = connection != "close" and (
            self.version != "HTTP/1.0" or connection == "keep-alive"
        )

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    async def body(self) -> bytes:
        """The whole body (read once); 411 without a length, 413 over the limit."""
        if self._body is not None:
            return self._body
        if "chunked" in self.header("transfer-encoding", "").lower():
            self.keep_alive = False  # the next request's start cannot be found
            raise LengthRequired("chunked bodies are not accepted: send a Content-Length header")
        length = self.header("content-length")
        if length is None:
            if self.method in ("GET", "HEAD"):
                self._body = b""
                return self._body
            self.keep_alive = False
            raise LengthRequired("a Content-Length header is required")
        if not (length.isascii() and length.isdigit()):
            self.keep_alive = False
            raise RequestError(f"Content-Length {length!r} is not a number")
        size = int(length)
        if size > self.max_body:
            if size <= DRAIN_FACTOR * self.max_body and not self._expects_continue():
                # Read and drop it, so the client gets the 413 rather than a broken pipe.
                while size > 0:
                    size -= len(await self.reader.readexactly(min(CHUNK, size)))
                self._body = b""
            else:
                self.keep_alive = False
            raise TooLarge(f"request body of {length} bytes exceeds the limit of {self.max_body}")
        if self._expects_continue():
            self.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._body = await self.reader.readexactly(size)
        return self._body

    def _expects_continue(self) -> bool:
        return self.header("expect", "").lower() == "100-continue"


def parse_head(data: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, target, version, headers) of a request head ending in a blank line."""
    lines = data.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadHead(f"malformed request line {lines[0][:100]!r}")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadHead(f"malformed header line {line[:100]!r}")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


class Server:
    """Serve ``handle(request) -> Response`` on ``host:port``."""

    def __init__(
        self,
        handle: Callable[[Request], Awaitable[Response]],
        max_body: int,
        name: str,
        access_log: bool = False,
        idle_timeout: float = 300.0,
    ) -> None:
        self.handle, self.max_body, self.name = handle, max_body, name
        # A keep-alive connection with no new request for this long is closed, so clients that
        # vanished without closing do not pile up.
        self.access_log, self.idle_timeout = access_log, idle_timeout
        self._date = (0, "")

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._connection, host, port, limit=HEAD_LIMIT, backlog=256
        )

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request: nobody to answer
        except asyncio.CancelledError:
            pass  # shutting down: the connection just closes
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read and answer one request; False when the connection should close."""
        # A timer, not wait_for: no extra task a request. When it fires, the read sees EOF.
        timer = asyncio.get_running_loop().call_later(self.idle_timeout, writer.transport.abort)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as err:
            if err.partial.strip():
                await self._write(writer, error_response(BadHead("request head cut short")), False)
            return False
        except asyncio.LimitOverrunError:
            limit = HeadTooLarge(f"request line and headers exceed {HEAD_LIMIT} bytes")
            await self._write(writer, error_response(limit), False)
            return False
        finally:
            timer.cancel()
        try:
            method, target, version, headers = parse_head(head[:-4])
        except BadHead as err:
            await self._write(writer, error_response(err), False)
            return False
        request = Request(method, target, version, headers, reader, writer, self.max_body)
        response = await self.handle(request)
        if request.keep_alive and request._body is None:
            try:  # the handler did not need the body: skip it to reach the next request
                await request.body()
            except RequestError:
                request.keep_alive = False
        await self._write(writer, response, request.keep_alive, method == "HEAD")
        if self.access_log:
            print(
                f'{time.strftime("%d/%b/%Y %H:%M:%S")} "{method} {target}" {response.status}',
                file=sys.stderr,
            )
        return request.keep_alive

    async def _write(
        self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool, head_only=False
    ) -> None:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        lines = [
            f"HTTP/1.1 {response.status} {_phrase(response.status)}",
            f"Server: {self.name}",
            f"Date: {self._date[1]}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
        ]
        lines += [f"{k}: {v}" for k, v in (response.headers or {}).items()]
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # One write: headers and body leave in the same segment (no Nagle stall).
        writer.write(head if head_only else head + response.body)
        await writer.drain()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def json_response(status: int, doc: dict) -> Response:
    return Response(status, json.dumps(doc).encode())


def error_response(err: RequestError) -> Response:
    """The 4xx answer for a bad request: ``{"error": "<what is wrong>"}``."""
    return json_response(err.status, {"error": str(err)})
