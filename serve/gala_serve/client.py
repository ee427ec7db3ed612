"""A small HTTP client for gala-serve's JSON routes: httpx (pooled keep-alive connections, safe
to share between threads) with tenacity's retries. Open Inference Protocol inference goes
through tritonclient (see :mod:`gala_serve.batch`)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from urllib.parse import urlparse

import httpx
import orjson
import tenacity

RETRY_STATUS = (429, 500, 502, 503, 504)


class ServerError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class _Retry(Exception):
    """A retryable answer (429/5xx): retried, or given back as it is once retries run out."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response


class Client:
    def __init__(
        self, url: str, timeout: float = 60.0, retries: int = 4, backoff: float = 0.2
    ) -> None:
        parsed = urlparse(url if "://" in url else f"http://{url}")
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.base = f"http://{self.host}:{self.port}"
        self.retries, self.backoff = retries, backoff
        # httpx writes the head and the body apart: without TCP_NODELAY, small bodies wait for
        # the server's delayed ACK (40 ms).
        nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        transport = httpx.HTTPTransport(socket_options=nodelay)
        self.http = httpx.Client(base_url=self.base, timeout=timeout, transport=transport)
        self.retried = 0

    def close(self) -> None:
        self.http.close()

    def _count(self, state: tenacity.RetryCallState) -> None:
        self.retried += 1

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request, retried on connection failures and 429/5xx with exponential backoff;
        (status, headers (case-insensitive), body) of the last answer."""

        def once() -> httpx.Response:
            response = self.http.request(method, path, content=body, headers=headers)
            if response.status_code in RETRY_STATUS:
                raise _Retry(response)
            return response

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((httpx.TransportError, _Retry)),
            stop=tenacity.stop_after_attempt(self.retries + 1),
            wait=tenacity.wait_exponential(multiplier=self.backoff),
            before_sleep=self._count,
            reraise=True,
        )
        try:
            response = retrying(once)
        except _Retry as last:
            response = last.response
        except httpx.TransportError as err:
            raise ConnectionError(f"{method} {self.base}{path}: {err}") from err
        return response.status_code, response.headers, response.content

    def json(self, method: str, path: str, doc: dict | None = None) -> dict:
        body = None if doc is None else orjson.dumps(doc)
        status, _, data = self.request(method, path, body, {"Content-Type": "application/json"})
        if status >= 400:
            raise ServerError(status, data.decode(errors="replace"))
        return orjson.loads(data)

    def classify(self, image: bytes, top_k: int = 5, full: bool = False) -> dict:
        path = f"/v1/classify?top_k={top_k}" + ("&full=1" if full else "")
        status, _, data = self.request(
            "POST", path, image, {"Content-Type": "application/octet-stream"}
        )
        if status >= 400:
            raise ServerError(status, data.decode(errors="replace"))
        return orjson.loads(data)["predictions"][0]

    def wait_ready(self, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> None:
        """Poll readiness; ``alive`` (e.g. the server process still runs) ends the wait early."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"server {self.host}:{self.port} stopped before it was ready")
            try:
                response = self.http.get("/v2/health/ready")
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server {self.host}:{self.port} not ready after {timeout} s")
