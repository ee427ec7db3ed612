"""A small HTTP client for gala-serve (standard library; one keep-alive connection a thread)."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from urllib.parse import urlparse

RETRY_STATUS = (429, 500, 502, 503, 504)
# What a reused keep-alive connection that the server closed in the meantime raises.
STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Client:
    def __init__(
        self, url: str, timeout: float = 60.0, retries: int = 4, backoff: float = 0.2
    ) -> None:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.local = threading.local()
        self.retried = 0

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            return conn, True
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.connect()
        # http.client sends headers and body apart: avoid Nagle's 40 ms stalls.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local.conn = conn
        return conn, False

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict, bytes]:
        """One request, retried on connection failures and 429/5xx with exponential backoff.

        A kept-alive connection the server has closed meanwhile (idle timeout, restart) is
        replaced at once, without counting as a retry.
        """
        attempt = 0
        while True:
            reused = False
            try:
                conn, reused = self._connection()
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
                if response.status in RETRY_STATUS and attempt < self.retries:
                    raise ConnectionError(f"HTTP {response.status}")
                return response.status, dict(response.getheaders()), data
            except (ConnectionError, OSError, http.client.HTTPException) as err:
                self.local.conn = None
                if reused and isinstance(err, STALE):
                    continue
                if attempt == self.retries:
                    raise
                attempt += 1
                self.retried += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))

    def json(self, method: str, path: str, doc: dict | None = None) -> dict:
        body = None if doc is None else json.dumps(doc).encode()
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"})
        if status >= 400:
            raise ServerError(status, data.decode(errors="replace"))
        return json.loads(data)

    def classify(self, image: bytes, top_k: int = 5, full: bool = False) -> dict:
        path = f"/v1/classify?top_k={top_k}" + ("&full=1" if full else "")
        status, _, data = self.request(
            "POST", path, image, {"Content-Type": "application/octet-stream"}
        )
        if status >= 400:
            raise ServerError(status, data.decode(errors="replace"))
        return json.loads(data)["predictions"][0]

    def wait_ready(self, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
        """Poll readiness; ``alive`` (e.g. the server process still runs) ends the wait early."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server {self.host}:{self.port} stopped before it was ready")
            try:
                status, _, _ = self.request("GET", "/v2/health/ready")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server {self.host}:{self.port} not ready after {timeout} s")
