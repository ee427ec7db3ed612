"""Overload: one gala-serve with a small queue, and more binary infer requests than it can hold,
sent back to back on one event loop with nothing held back (``--flood``)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from gala_serve.client import Client

from gala_serve_bench import servers
from gala_serve_bench.load import request


def flood(
    url: str, shape: tuple[int, ...], concurrency: int, requests: int, rows: int, timeout: float
) -> dict:
    """``requests`` binary infer requests of ``rows`` samples, ``concurrency`` at a time, back
    to back on one event loop (httpx): the count of each answer (a status, ``timeout`` or the
    transport error), the 503 share, the ``Retry-After`` values seen, latency quantiles, and
    the seconds one plain request takes afterwards."""
    body, headers = request("binary", shape, rows)
    result = asyncio.run(_flood(url, body, headers, concurrency, requests, timeout))
    result["rows"] = rows
    with httpx.Client(base_url=url, timeout=timeout) as http:
        start = time.perf_counter()
        after = http.post("/v2/models/gala/infer", content=body, headers=headers)
        result["after_s"], result["after_status"] = time.perf_counter() - start, after.status_code
    return result


async def _flood(url: str, body: bytes, headers: dict, concurrency: int, requests: int, timeout):
    answers: collections.Counter = collections.Counter()
    latencies: list[tuple[str, float]] = []
    retry_after: set = set()
    todo = iter(range(requests))  # shared: each client takes the next until none is left
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:

        async def client() -> None:
            for _ in todo:
                start = time.perf_counter()
                try:
                    response = await http.post(
                        "/v2/models/gala/infer", content=body, headers=headers
                    )
                    answer = response.status_code
                    if answer == 503:
                        retry_after.add(response.headers.get("retry-after"))
                except httpx.TimeoutException:
                    answer = "timeout"
                except httpx.TransportError as err:
                    answer = type(err).__name__
                answers[answer] += 1
                latencies.append((str(answer), time.perf_counter() - start))

        begin = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - begin
    q = np.quantile([t for _, t in latencies], [0.5, 0.99, 1.0])
    by_answer = {}
    for answer in sorted({a for a, _ in latencies}):
        mine = np.quantile([t for a, t in latencies if a == answer], [0.5, 0.99])
        by_answer[answer] = {"p50_ms": 1000 * mine[0], "p99_ms": 1000 * mine[1]}
    return {
        "requests": requests,
        "concurrency": concurrency,
        "seconds": seconds,
        "answers": {str(k): v for k, v in sorted(answers.items(), key=str)},
        "share_503": answers[503] / requests,
        "retry_after": sorted(map(str, retry_after)),
        "p50_ms": 1000 * q[0],
        "p99_ms": 1000 * q[1],
        "max_ms": 1000 * q[2],
        "by_answer": by_answer,
    }


def run(args: argparse.Namespace, shape: tuple[int, ...]) -> dict:
    """One gala-serve with a small queue, flooded: the figures."""
    logs = Path(tempfile.mkdtemp(prefix="gala-serve-flood-"))
    log = logs / "flood.log"
    flags = ["--max-queue", str(args.max_queue), "--max-request-batch", str(args.rows)]
    proc, port, _ = servers.gala(args.artifact, args.flood_max_batch, args.providers, log, *flags)
    try:
        servers.wait_ready(proc, port, log)
        url = f"http://127.0.0.1:{port}"
        result = flood(url, shape, args.concurrency, args.requests, args.rows, timeout=30)
        result.update(
            benchmark="flood",
            cpu_count=os.cpu_count(),
            max_queue=args.max_queue,
            max_batch=args.flood_max_batch,
            provider=Client(url).json("GET", "/v2/models/gala")["parameters"]["provider"],
            peak_rss_mib=servers.peak_rss_mib(proc.pid),
        )
    finally:
        servers.stop([proc])
        shutil.rmtree(logs, ignore_errors=True)
    return result
