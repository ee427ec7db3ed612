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
import base64
import json
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np

from gala_serve import __version__, protocol
from gala_serve.batcher import DynamicBatcher
from gala_serve.errors import LengthRequired, NotFound, RequestError, TooLarge
from gala_serve.metrics import BATCH_BUCKETS, Metrics
from gala_serve.model import ArtifactError, Model
from gala_serve.preprocess import decode, eval_array

DRAIN_FACTOR = 4  # bodies up to 4x the limit are read and dropped before the 413
MODEL_ROUTE = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?(/ready|/infer)?$")


class Service:
    """Everything a request handler needs: the model, the batcher, limits and metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.metrics = args, Metrics()
        self.model: Model | None = None
        self.batcher: DynamicBatcher | None = None
        self.ready = threading.Event()

    def load(self) -> None:
        self.model = Model(self.args.artifact, self.args.providers, self.args.threads)

        def record(size: int, seconds: float) -> None:
            self.metrics.observe("gala_batch_size", size, BATCH_BUCKETS)
            self.metrics.observe("gala_inference_seconds", seconds)

        self.batcher = DynamicBatcher(
            self.model.logits, self.args.max_batch, self.args.max_delay_ms / 1000, record
        )
        self.ready.set()

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        logits = self.batcher.submit(batch)
        raw, adjusted = self.model.probabilities(logits)
        self.metrics.inc("gala_images_total", len(batch))
        return {"probabilities": adjusted, "raw_probabilities": raw, "logits": logits}

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
                "class_names": art["class_names"],
                "train_class_counts": art.get("train_class_counts"),
                "tau": m.tau,
                "rebalanced": m.divisor is not None,
                "preprocess": art["preprocess"],
                "max_batch": self.args.max_batch,
            },
        }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"gala-serve/{__version__}"
    service: Service  # set on the subclass made by make_server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes; without TCP_NODELAY, Nagle's algorithm and
        # delayed ACKs add about 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args) -> None:
        if self.service.args.access_log:
            super().log_message(format, *args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: dict) -> None:
        self._send(status, json.dumps(doc).encode())

    def _body(self) -> bytes:
        if self._cached_body is not None:
            return self._cached_body
        length = self.headers.get("Content-Length")
        if length is None:
            raise LengthRequired("a Content-Length header is required")
        try:
            size = int(length)
        except ValueError as err:
            raise RequestError(f"Content-Length {length!r} is not a number") from err
        limit = self.service.args.max_body_bytes
        if size > limit:
            if size <= DRAIN_FACTOR * limit:
                # Read and drop it, so the client gets the 413 rather than a broken pipe and the
                # connection stays usable; far larger bodies just get the connection closed.
                while size > 0:
                    size -= len(self.rfile.read(min(1 << 20, size))) or size
            else:
                self.close_connection = True
            raise TooLarge(f"request body of {length} bytes exceeds the limit of {limit}")
        self._cached_body = self.rfile.read(size)
        return self._cached_body

    def _handle(self, method: str) -> None:
        start, endpoint, status = time.perf_counter(), "other", 500
        self._cached_body = None
        # Tell the batcher a sample is on its way while the request is parsed, so a batch being
        # formed waits for it (and a lone request does not wait at all).
        self._announced = method == "POST" and self.service.ready.is_set()
        if self._announced:
            self.service.batcher.expect(+1)
        try:
            if method == "POST":
                self._body()  # read first: an error answer must not leave the body unread
            endpoint, status = self._route(method)
        except RequestError as err:
            status = err.status
            self._json(status, {"error": str(err)})
        except Exception as err:  # a bug or the model failing: 500, and keep serving
            status = 500
            self._json(500, {"error": f"internal error: {type(err).__name__}: {err}"})
        finally:
            self._withdraw()
            m = self.service.metrics
            m.inc("gala_requests_total", endpoint=endpoint)
            if status >= 400:
                m.inc("gala_request_errors_total", endpoint=endpoint, code=str(status))
            m.observe(
                "gala_request_latency_seconds", time.perf_counter() - start, endpoint=endpoint
            )

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _route(self, method: str) -> tuple[str, int]:
        url = urlparse(self.path)
        path, svc = url.path.rstrip("/") or "/", self.service
        if method == "GET" and path == "/v2/health/live":
            self._json(200, {"live": True})
            return "live", 200
        if method == "GET" and path == "/v2/health/ready":
            ready = svc.ready.is_set()
            self._json(200 if ready else 503, {"ready": ready})
            return "ready", 200 if ready else 503
        if method == "GET" and path == "/metrics":
            self._send(200, svc.metrics.render().encode(), "text/plain; version=0.0.4")
            return "metrics", 200
        if method == "GET" and path == "/v2":
            self._json(
                200,
                {
                    "name": "gala-serve",
                    "version": __version__,
                    "extensions": ["binary_tensor_data"],
                },
            )
            return "server_metadata", 200
        if not svc.ready.is_set():
            self._json(503, {"error": "the model is still loading"})
            return "not_ready", 503
        if method == "POST" and path == "/v1/classify":
            return self._classify(parse_qs(url.query))
        match = MODEL_ROUTE.match(path)
        if match is None:
            raise NotFound(f"no endpoint {method} {path}")
        if match.group(1) != svc.args.model_name:
            raise NotFound(
                f"unknown model {match.group(1)!r}; this server has {svc.args.model_name!r}"
            )
        action = match.group(2)
        if method == "GET" and action is None:
            self._json(200, svc.metadata())
            return "model_metadata", 200
        if method == "GET" and action == "/ready":
            self._json(200, {"name": svc.args.model_name, "ready": True})
            return "model_ready", 200
        if method == "POST" and action == "/infer":
            return self._infer()
        raise NotFound(f"no endpoint {method} {path}")

    def _infer(self) -> tuple[str, int]:
        svc = self.service
        header = self.headers.get(protocol.HEADER)
        request = protocol.parse_request(self._body(), int(header) if header else None)
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
        body, header_length = protocol.encode_response(
            svc.args.model_name, request, self._predict(np.ascontiguousarray(batch))
        )
        headers = {protocol.HEADER: str(header_length)} if header_length is not None else None
        content = "application/octet-stream" if header_length is not None else "application/json"
        self._send(200, body, content, headers)
        return "infer", 200

    def _withdraw(self) -> None:
        if self._announced:
            self._announced = False
            self.service.batcher.expect(-1)

    def _predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._withdraw()  # from here on the request waits in the batcher's queue
        return self.service.predict(batch)

    def _check_batch(self, size: int) -> None:
        if size > self.service.args.max_request_batch:
            raise TooLarge(
                f"{size} samples in one request; the limit is {self.service.args.max_request_batch}"
            )

    def _images(self) -> list[bytes]:
        body = self._body()
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip()
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

    def _classify(self, query: dict) -> tuple[str, int]:
        svc = self.service
        try:
            top_k = int(query.get("top_k", ["5"])[0])
        except ValueError as err:
            raise RequestError("top_k must be an integer") from err
        full = query.get("full", ["0"])[0] in ("1", "true")
        images = self._images()
        self._check_batch(len(images))
        pre = svc.model.artifact["preprocess"]
        batch = np.stack(
            [
                eval_array(decode(data, svc.args.max_image_pixels, f"image {i}"), pre)
                for i, data in enumerate(images)
            ]
        )
        out = self._predict(batch)
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
        self._json(200, {"model_name": svc.args.model_name, "predictions": predictions})
        return "classify", 200


def make_server(args: argparse.Namespace) -> tuple[ThreadingHTTPServer, Service]:
    service = Service(args)
    handler = type("GalaHandler", (Handler,), {"service": service})
    server_class = type("GalaServer", (ThreadingHTTPServer,), {"request_queue_size": 256})
    server = server_class((args.host, args.port), handler)
    server.daemon_threads = True
    return server, service


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
    p.add_argument("--max-body-bytes", type=int, default=64 << 20)
    p.add_argument("--max-image-pixels", type=int, default=40_000_000)
    p.add_argument("--max-request-batch", type=int, default=1024, help="samples per request")
    p.add_argument("--access-log", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server, service = make_server(args)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    try:
        service.load()  # at start-up, not at import; /v2/health/ready says when it is done
    except (ArtifactError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        server.shutdown()
        return 2
    host, port = server.server_address[:2]
    print(
        f"gala-serve: model {args.model_name!r} on {service.model.provider}, "
        f"max batch {args.max_batch}, listening on http://{host}:{port}",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
