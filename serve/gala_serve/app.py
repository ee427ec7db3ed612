"""gala-serve: the Open Inference Protocol over HTTP for a gala-scale artifact.

    gala-serve --artifact runs/x/export [--model-name gala] [--host 127.0.0.1] [--port 8000]
               [--max-batch 64] [--max-delay-ms 5] [--providers auto|cuda|cpu]

Endpoints (KServe v2): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``,
``/v2/models/<name>``, ``/v2/models/<name>/ready``; ``POST /v2/models/<name>/infer`` with JSON
tensors or the binary tensor data extension (input ``input``: FP32 [N, 3, H, W], normalised as
the artifact's ``preprocess`` says; outputs ``probabilities`` (re-balanced with the stored PN
scales), ``raw_probabilities`` and ``logits``). ``POST /v1/classify`` takes encoded images (the
body itself, or JSON ``{"images": [base64, ...]}``) and returns the top-k classes with
re-balanced and raw probabilities; ``?top_k=5&full=1``. ``GET /metrics``: Prometheus.
Bad requests get a 4xx JSON ``{"error": ...}`` and the server keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gala_serve import __version__, protocol
from gala_serve.batcher import DynamicBatcher
from gala_serve.errors import NotFound, RequestError, TooLarge
from gala_serve.httpio import Request, Response, Server, error_response, json_response
from gala_serve.metrics import BATCH_BUCKETS, Metrics
from gala_serve.model import CONV_ALGO_SEARCH, ArtifactError, Model
from gala_serve.preprocess import decode, eval_array

# Bigger requests are parsed, and bigger answers encoded, in the pool, off the event loop.
OFFLOAD_BYTES = 1 << 20
OFFLOAD_VALUES = 1 << 16
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?$")


class Service:
    """Everything a request handler needs: the model, the batcher, limits and metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.metrics = args, Metrics()
        self.model: Model | None = None
        self.batcher: DynamicBatcher | None = None
        self.warmup: dict = {}
        self.ready = threading.Event()
        self.pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="offload")

    def load(self) -> None:
        a = self.args
        self.model = Model(
            a.artifact, a.providers, a.threads, a.device_id, a.cudnn_conv_algo_search
        )
        self.metrics.set(
            "gala_serve_provider",
            1,
            provider=self.model.provider,
            requested=a.providers,
            fallback="true" if self.model.fallback else "false",
        )
        sizes = warmup_sizes(a.warmup, self.model.provider, a.max_batch)
        self.warmup = {"batch_sizes": len(sizes), "seconds": round(self.model.warm_up(sizes), 3)}

        def record(size: int, seconds: float) -> None:
            self.metrics.observe("gala_batch_size", size, BATCH_BUCKETS)
            self.metrics.observe("gala_inference_seconds", seconds)

        # The batcher thread also computes the softmax and re-balancing, once a batch.
        self.batcher = DynamicBatcher(
            self.model.outputs, self.args.max_batch, self.args.max_delay_ms / 1000, record
        )
        self.ready.set()

    async def handle(self, request: Request) -> Response:
        return await Exchange(self, request).answer()

    async def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out, k = await self.batcher.infer(batch), self.model.num_classes
        self.metrics.inc("gala_images_total", len(batch))
        return {
            "logits": out[:, :k],
            "raw_probabilities": out[:, k : 2 * k],
            "probabilities": out[:, 2 * k :],
        }

    async def offload(self, fn, *args, big: bool = True):
        """``fn(*args)``, in the worker pool when ``big`` (CPU work that would stall the loop)."""
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def metadata(self) -> dict:
        m, art = self.model, self.model.artifact
        k = m.num_classes
        return {
            "name": self.args.model_name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": m.input_name, "datatype": "FP32", "shape": [-1, *m.input_shape]}],
            "outputs": [
                {"name": n, "datatype": "FP32", "shape": [-1, k]}
                for n in ("probabilities", "raw_probabilities", "logits")
            ],
            "parameters": {
                "provider": m.provider,
                "provider_requested": self.args.providers,
                "provider_fallback": m.fallback,
                "warmup": self.warmup,
                "class_names": art["class_names"],
                "train_class_counts": art.get("train_class_counts"),
                "tau": m.tau,
                "rebalanced": m.divisor is not None,
                "preprocess": art["preprocess"],
                "max_batch": self.args.max_batch,
            },
        }


def warmup_sizes(mode: str, provider: str, max_batch: int) -> list[int]:
    """Batch sizes run once before ``/ready``: every size the batcher can form (``all``; what
    ``auto`` does on a GPU, where each new shape is tuned on first use), the smallest and the
    largest (``auto`` on a CPU: memory arenas grown) or none."""
    if mode == "none":
        return []
    if mode == "all" or provider != "CPUExecutionProvider":
        return list(range(1, max_batch + 1))
    return sorted({1, max_batch})


class Exchange:
    """One request on its way to a :class:`Response`: routing, parsing, the model, errors."""

    def __init__(self, service: Service, request: Request) -> None:
        self.service, self.request = service, request
        # Tell the batcher a sample is on its way while the request is read, so a batch being
        # formed waits for it (and a lone request does not wait at all).
        self.announced = request.method == "POST" and service.ready.is_set()
        if self.announced:
            service.batcher.expect(+1)

    async def answer(self) -> Response:
        start, endpoint = time.perf_counter(), "other"
        try:
            if self.request.method == "POST":
                await self.request.body()  # read first: an error must not leave it unread
            endpoint, response = await self._route()
        except RequestError as err:
            response = error_response(err)
        except Exception as err:  # a bug or the model failing: 500, and keep serving
            response = json_response(500, {"error": f"internal error: {type(err).__name__}: {err}"})
        finally:
            self._withdraw()
        m = self.service.metrics
        m.inc("gala_requests_total", endpoint=endpoint)
        if response.status >= 400:
            m.inc("gala_request_errors_total", endpoint=endpoint, code=str(response.status))
        m.observe("gala_request_latency_seconds", time.perf_counter() - start, endpoint=endpoint)
        return response

    async def _route(self) -> tuple[str, Response]:
        method, path, svc = self.request.method, self.request.path, self.service
        if method in ("GET", "HEAD"):
            if path == "/v2/health/live":
                return "live", json_response(200, {"live": True})
            if path == "/v2/health/ready":
                ready = svc.ready.is_set()
                return "ready", json_response(200 if ready else 503, {"ready": ready})
            if path == "/metrics":
                return "metrics", Response(
                    200, svc.metrics.render().encode(), "text/plain; version=0.0.4"
                )
            if path == "/v2":
                doc = {
                    "name": "gala-serve",
                    "version": __version__,
                    "extensions": ["binary_tensor_data"],
                }
                return "server_metadata", json_response(200, doc)
        if not svc.ready.is_set():
            return "not_ready", json_response(503, {"error": "the model is still loading"})
        if method == "POST" and path == "/v1/classify":
            return "classify", await self._classify()
        match = MODEL_ROUTE.match(path)
        if match is None:
            raise NotFound(f"no endpoint {method} {path}")
        if match.group(1) != svc.args.model_name:
            raise NotFound(
                f"unknown model {match.group(1)!r}; this server has {svc.args.model_name!r}"
            )
        action = match.group(2)
        if method == "GET" and action is None:
            return "model_metadata", json_response(200, svc.metadata())
        if method == "GET" and action == "/ready":
            return "model_ready", json_response(200, {"name": svc.args.model_name, "ready": True})
        if method == "POST" and action == "/infer":
            return "infer", await self._infer()
        raise NotFound(f"no endpoint {method} {path}")

    async def _infer(self) -> Response:
        svc, body = self.service, await self.request.body()
        header = self.request.header(protocol.HEADER)
        length = int(header) if header else None
        big = len(body) > OFFLOAD_BYTES  # long JSON parses off the loop, which keeps serving
        request = await svc.offload(protocol.parse_request, body, length, big=big)
        name = svc.model.input_name
        if set(request.inputs) != {name}:
            raise RequestError(f"expected one input named {name!r}, got {sorted(request.inputs)}")
        batch = request.inputs[name]
        expected = svc.model.input_shape
        if batch.dtype != np.float32:
            raise RequestError(f"input {name!r} must be FP32, got {protocol.NAMES[batch.dtype]}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or len(batch) == 0:
            raise RequestError(
                f"input {name!r} must have shape [N>0, {', '.join(map(str, expected))}]"
                f", got {list(batch.shape)}"
            )
        self._check_batch(len(batch))
        if not np.isfinite(batch).all():
            raise RequestError(f"input {name!r} contains NaN or inf")
        outputs = await self._predict(np.ascontiguousarray(batch))
        body, header_length = await svc.offload(
            protocol.encode_response,
            svc.args.model_name,
            request,
            outputs,
            big=len(batch) * svc.model.num_classes > OFFLOAD_VALUES,  # e.g. 8,142 classes as JSON
        )
        if header_length is None:
            return Response(200, body)
        return Response(
            200, body, "application/octet-stream", {protocol.HEADER: str(header_length)}
        )

    def _withdraw(self) -> None:
        if self.announced:
            self.announced = False
            self.service.batcher.expect(-1)

    async def _predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._withdraw()  # from here on the request waits in the batcher's queue
        return await self.service.predict(batch)

    def _check_batch(self, size: int) -> None:
        if size > self.service.args.max_request_batch:
            raise TooLarge(
                f"{size} samples in one request; the limit is {self.service.args.max_request_batch}"
            )

    async def _images(self) -> list[bytes]:
        body = await self.request.body()
        kind = (self.request.header("content-type") or "").split(";")[0].strip()
        if kind != "application/json":
            return [body]
        doc = json.loads(body) if body else {}
        images = doc.get("images") if isinstance(doc, dict) else None
        if not isinstance(images, list) or not images:
            raise RequestError("JSON body needs a non-empty 'images' list of base64 strings")
        try:
            return [base64.b64decode(item, validate=True) for item in images]
        except (ValueError, TypeError) as err:
            raise RequestError(f"an image is not valid base64 ({err})") from err

    def _decode(self, images: list[bytes]) -> np.ndarray:
        svc = self.service
        pre = svc.model.artifact["preprocess"]
        return np.stack(
            [
                eval_array(decode(data, svc.args.max_image_pixels, f"image {i}"), pre)
                for i, data in enumerate(images)
            ]
        )

    async def _classify(self) -> Response:
        svc, query = self.service, self.request.query
        try:
            top_k = int(query.get("top_k", ["5"])[0])
        except ValueError as err:
            raise RequestError("top_k must be an integer") from err
        full = query.get("full", ["0"])[0] in ("1", "true")
        images = await self._images()
        self._check_batch(len(images))
        # Decoding is the costly part of this endpoint: in the pool, while the loop serves on.
        out = await self._predict(await svc.offload(self._decode, images))
        names = svc.model.artifact["class_names"]
        k = max(1, min(top_k, svc.model.num_classes))
        predictions = []
        for adjusted, raw in zip(out["probabilities"], out["raw_probabilities"], strict=True):
            order = np.argsort(-adjusted, kind="stable")[:k]
            entry = {
                "top_k": [
                    {
                        "index": int(i),
                        "class": names[i],
                        "probability": float(adjusted[i]),
                        "raw_probability": float(raw[i]),
                    }
                    for i in order
                ]
            }
            if full:
                entry["probabilities"] = adjusted.tolist()
                entry["raw_probabilities"] = raw.tolist()
            predictions.append(entry)
        return json_response(200, {"model_name": svc.args.model_name, "predictions": predictions})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gala-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifact", required=True, help="folder written by gala_scale.export")
    p.add_argument("--model-name", default="gala")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="samples per ONNX Runtime call")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="wait to fill a batch")
    p.add_argument("--providers", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    p.add_argument("--device-id", type=int, default=0, help="the GPU the CUDA provider uses")
    p.add_argument(
        "--cudnn-conv-algo-search",
        choices=CONV_ALGO_SEARCH,
        default="EXHAUSTIVE",
        help="how cuDNN picks convolution algorithms (CUDA provider)",
    )
    p.add_argument(
        "--warmup",
        choices=("auto", "all", "none"),
        default="auto",
        help="batch sizes run before /ready: auto (every size on a GPU, 1 and --max-batch on "
        "a CPU), all, none",
    )
    p.add_argument("--max-body-bytes", type=int, default=64 << 20)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--max-request-batch", type=int, default=1024, help="samples per request")
    p.add_argument(
        "--idle-timeout", type=float, default=300.0, help="close idle keep-alive connections (s)"
    )
    p.add_argument("--access-log", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


async def serve(args: argparse.Namespace) -> int:
    """Listen, load the model (live at once, ready when loaded), serve until SIGTERM/SIGINT."""
    service = Service(args)
    http = Server(
        service.handle,
        args.max_body_bytes,
        f"gala-serve/{__version__}",
        args.access_log,
        args.idle_timeout,
    )
    try:
        server = await http.start(args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, service.load)  # at start-up, not at import
    except (ArtifactError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        server.close()
        return 2
    host, port = server.sockets[0].getsockname()[:2]
    print(
        f"gala-serve: model {args.model_name!r} on {service.model.provider}, "
        f"max batch {args.max_batch} (warmed up {service.warmup['batch_sizes']} batch sizes in "
        f"{service.warmup['seconds']} s), listening on http://{host}:{port}",
        flush=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    service.pool.shutdown(wait=False, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
