"""gala-serve: the Open Inference Protocol over HTTP and gRPC for a gala-scale artifact.

    gala-serve --artifact runs/x/export [--model-name gala] [--host 127.0.0.1] [--port 8000]
               [--grpc-port 8001] [--max-batch 64] [--max-delay-ms 5] [--providers auto|cuda|cpu]
               [--max-queue 2048] [--batch-timeout 60]

HTTP (KServe v2, served by uvicorn): ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``,
``/v2/models/<name>``, ``/v2/models/<name>/ready``; ``POST /v2/models/<name>/infer`` with JSON
tensors or the binary tensor data extension. gRPC (``inference.GRPCInferenceService``, as
Triton and KServe): the same on ``--grpc-port`` (0: off). Inputs, one of: ``input``, FP32
[N, 3, H, W] normalised as the artifact's ``preprocess`` says, or ``image``, BYTES [N] of encoded
JPEG/PNG/WebP files. Outputs: ``probabilities`` (re-balanced with the stored PN scales, inside
the graph), ``raw_probabilities`` and ``logits``. ``POST /v1/classify`` (a curl convenience)
takes one encoded image as the body and answers the top-k classes by name; ``?top_k=5&full=1``.
``GET /metrics``: Prometheus. Bad requests get a 4xx JSON ``{"error": ...}`` (gRPC:
INVALID_ARGUMENT and the like) and the server keeps serving. Over ``--max-queue`` samples waiting
for the model, requests are shed at once: 503 with ``Retry-After`` (gRPC: UNAVAILABLE).
``/v2/health/ready`` answers 503 with the reason while the model loads and when the batcher's
worker is dead or one model call has run past ``--batch-timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gala_serve import __version__, protocol
from gala_serve.batcher import DynamicBatcher
from gala_serve.errors import Loading, NotFound, RequestError, TooLarge
from gala_serve.metrics import Metrics
from gala_serve.model import CONV_ALGO_SEARCH, OUTPUTS, ArtifactError, Model
from gala_serve.preprocess import FORMATS, decode, eval_array

IMAGE = "image"  # the BYTES input of encoded images
log = logging.getLogger("gala_serve")


class Ticket:
    """A request announced to the batcher as on its way (its body is in, it is being parsed or
    decoded), so that a batch being formed waits for it; withdrawn when it is queued or fails.
    A request whose body is still arriving is never announced: a stalled client cannot hold a
    batch back."""

    def __init__(self, batcher: DynamicBatcher) -> None:
        self.batcher = batcher
        batcher.expect(+1)

    def withdraw(self) -> None:
        if self.batcher is not None:
            self.batcher.expect(-1)
            self.batcher = None


class Service:
    """What every protocol front needs: the model, the batcher, limits and metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.metrics = args, Metrics()
        self.model: Model | None = None
        self.batcher: DynamicBatcher | None = None
        self.warmup: dict = {}
        self.ready = threading.Event()
        self.pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="offload")
        self.formats = tuple(f.strip().upper() for f in args.image_formats.split(","))

    def load(self) -> None:
        a = self.args
        self.model = Model(
            a.artifact, a.providers, a.threads, a.device_id, a.cudnn_conv_algo_search
        )
        self.metrics.provider.labels(
            self.model.provider, a.providers, "true" if self.model.fallback else "false"
        ).set(1)
        sizes = warmup_sizes(a.warmup, self.model.provider, a.max_batch)
        self.warmup = {"batch_sizes": len(sizes), "seconds": round(self.model.warm_up(sizes), 3)}
        self.batcher = DynamicBatcher(
            self.model.outputs,
            a.max_batch,
            a.max_delay_ms / 1000,
            self.metrics.batch,
            max_queue=a.max_queue,
            stall_s=a.batch_timeout,
            on_failure=self.metrics.batch_failure,
        )
        self.metrics.watch_queue(lambda: self.batcher.queued)
        self.ready.set()

    def not_ready(self) -> str | None:
        """Why the server cannot serve inference now (loading, a dead or wedged batcher), or
        None: what the readiness endpoints answer."""
        if not self.ready.is_set():
            return "the model is still loading"
        return self.batcher.health()

    def ticket(self) -> Ticket:
        if not self.ready.is_set():
            raise Loading("the model is still loading")
        return Ticket(self.batcher)

    async def offload(self, fn, *args, big: bool = True):
        """``fn(*args)``, in the worker pool when ``big`` (CPU work that would stall the loop)."""
        if not big:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_model(self, name: str) -> None:
        if name != self.args.model_name:
            have = self.args.model_name
            raise NotFound(f"unknown model {name[:100]!r}; this server has {have!r}")

    def check_batch(self, size: int, what: str) -> None:
        if size == 0:
            raise RequestError(f"{what}: an empty batch")
        if size > self.args.max_request_batch:
            raise TooLarge(
                f"{what}: {size} samples in one request; the limit is {self.args.max_request_batch}"
            )

    async def infer(self, request: protocol.InferRequest, ticket: Ticket) -> dict:
        """The model's outputs for an Open Inference Protocol request (either input), those it
        asks to classify as class labels (the classification extension)."""
        outputs = await self._infer(request, ticket)
        if not request.classify:
            return outputs
        names = self.model.artifact["class_names"]
        big = len(next(iter(outputs.values()))) * self.model.num_classes > protocol.OFFLOAD_VALUES
        return await self.offload(protocol.classified, request, outputs, names, big=big)

    async def _infer(self, request: protocol.InferRequest, ticket: Ticket) -> dict:
        m = self.model
        names = sorted(request.inputs)
        if names not in ([m.input_name], [IMAGE]):
            raise RequestError(
                f"expected one input: {m.input_name!r} (FP32 [N, "
                f"{', '.join(map(str, m.input_shape))}]) or {IMAGE!r} (BYTES [N], encoded "
                f"{'/'.join(self.formats)}); got {[n[:40] for n in names][:4]}"
            )
        unknown = [n for n in request.outputs or () if n not in OUTPUTS]
        if unknown:
            raise RequestError(f"unknown outputs {unknown[:4]}; this model has {list(OUTPUTS)}")
        if names == [IMAGE]:
            images = request.inputs[IMAGE]
            if images.dtype != object or not (
                images.ndim == 1 or (images.ndim == 2 and images.shape[1] == 1)
            ):
                raise RequestError(f"input {IMAGE!r} must be BYTES of shape [N] or [N, 1]")
            return await self.classify_images(list(images.ravel()), ticket)
        batch = request.inputs[m.input_name]
        name = m.input_name
        if batch.dtype != np.float32:
            raise RequestError(f"input {name!r} must be FP32, got {protocol.NAMES[batch.dtype]}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != m.input_shape or len(batch) == 0:
            raise RequestError(
                f"input {name!r} must have shape [N>0, {', '.join(map(str, m.input_shape))}]"
                f", got {list(batch.shape)[:8]}"
            )
        self.check_batch(len(batch), f"input {name!r}")
        if not np.isfinite(batch).all():
            raise RequestError(f"input {name!r} contains NaN or inf")
        return await self.predict(np.ascontiguousarray(batch), ticket)

    async def classify_images(self, images: list[bytes], ticket: Ticket) -> dict:
        self.check_batch(len(images), f"input {IMAGE!r}")
        # Decoding is the costly part: in the pool, while the loop serves on.
        return await self.predict(await self.offload(self._decode, images), ticket)

    def _decode(self, images: list[bytes]) -> np.ndarray:
        a, pre = self.args, self.model.artifact["preprocess"]
        arrays = []
        for i, data in enumerate(images):
            what = f"image {i}"
            img = decode(data, a.max_image_pixels, what, self.formats, pre, a.max_resized_pixels)
            arrays.append(eval_array(img, pre))
        return np.stack(arrays)

    async def predict(self, batch: np.ndarray, ticket: Ticket) -> dict[str, np.ndarray]:
        ticket.withdraw()  # from here on the request waits in the batcher's queue
        out, k = await self.batcher.infer(batch), self.model.num_classes
        self.metrics.images.inc(len(batch))
        return {name: out[:, i * k : (i + 1) * k] for i, name in enumerate(OUTPUTS)}

    def top_k(self, outputs: dict[str, np.ndarray], k: int, full: bool) -> list[dict]:
        """Each row's ``k`` most likely classes (re-balanced), with names and raw probability."""
        names = self.model.artifact["class_names"]
        k = max(1, min(k, self.model.num_classes))
        answers = []
        for adjusted, raw in zip(
            outputs["probabilities"], outputs["raw_probabilities"], strict=True
        ):
            entry = {"top_k": protocol.top_classes(adjusted, raw, names, k)}
            if full:
                entry["probabilities"] = adjusted
                entry["raw_probabilities"] = raw
            answers.append(entry)
        return answers

    def server_metadata(self) -> dict:
        return {
            "name": "gala-serve",
            "version": __version__,
            "extensions": ["binary_tensor_data", "classification"],
        }

    def metadata(self) -> dict:
        m, art = self.model, self.model.artifact
        k = m.num_classes
        return {
            "name": self.args.model_name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": m.input_name, "datatype": "FP32", "shape": [-1, *m.input_shape]},
                {"name": IMAGE, "datatype": "BYTES", "shape": [-1]},
            ],
            "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, k]} for n in OUTPUTS],
            "parameters": {
                "provider": m.provider,
                "provider_requested": self.args.providers,
                "provider_fallback": m.fallback,
                "warmup": self.warmup,
                "class_names": art["class_names"],
                "train_class_counts": art.get("train_class_counts"),
                "tau": m.tau,
                "rebalanced": m.rebalanced,
                "preprocess": art["preprocess"],
                "image_formats": list(self.formats),
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gala-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--artifact", required=True, help="folder written by gala_scale.export")
    p.add_argument("--model-name", default="gala")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="HTTP")
    p.add_argument("--grpc-port", type=int, default=0, help="gRPC (0: off; Triton uses 8001)")
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
    p.add_argument("--max-image-pixels", type=int, default=40_000_000, help="decoded image")
    p.add_argument(
        "--max-resized-pixels",
        type=int,
        default=4_000_000,
        help="an image after the eval resize (e.g. 256 x 15,625 for a 256-pixel shorter side)",
    )
    p.add_argument(
        "--image-formats", default=",".join(FORMATS), help="the encoded formats accepted"
    )
    p.add_argument("--max-request-batch", type=int, default=1024, help="samples per request")
    p.add_argument(
        "--max-queue",
        type=int,
        default=2048,
        help="samples waiting for the model (all requests together); past it a request is "
        "refused at once: HTTP 503 with Retry-After, gRPC UNAVAILABLE",
    )
    p.add_argument(
        "--batch-timeout",
        type=float,
        default=60.0,
        help="seconds one model call may take before the readiness endpoints report the "
        "batcher wedged (503)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="seconds from a request's first byte to its last; a slower client is cut (408)",
    )
    p.add_argument(
        "--max-connections", type=int, default=1000, help="open HTTP connections; beyond: 503"
    )
    p.add_argument(
        "--idle-timeout", type=float, default=300.0, help="close idle keep-alive connections (s)"
    )
    p.add_argument("--access-log", action="store_true")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_request_batch", "max_connections", "max_body_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_queue < args.max_request_batch:
        p.error(
            f"--max-queue {args.max_queue} is below --max-request-batch "
            f"{args.max_request_batch}: the largest request would never be admitted"
        )
    if args.request_timeout <= 0 or args.idle_timeout <= 0 or args.batch_timeout <= 0:
        p.error("--request-timeout, --idle-timeout and --batch-timeout must be > 0")
    unknown = set(args.image_formats.upper().split(",")) - set(FORMATS)
    if unknown:
        p.error(f"--image-formats: {sorted(unknown)} not among {FORMATS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP by name: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # an answer written in two parts (head, body) waits 40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> int:
    """Listen, load the model (live at once, ready when loaded), serve until SIGTERM/SIGINT."""
    from gala_serve import grpc_service, uvicorn_protocol

    service = Service(args)
    try:
        server = uvicorn_protocol.server(service)
    except uvicorn_protocol.UvicornMismatch as err:  # before a port is taken
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        sock = _listen(args.host, args.port)
    except OSError as err:
        print(f"error: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    stop = lambda: setattr(server, "should_exit", True)  # noqa: E731
    loop = asyncio.get_running_loop()
    # uvicorn takes SIGTERM/SIGINT while it serves and raises them again when it is done: these
    # handlers answer those, and the signals during start-up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    http = asyncio.create_task(server.serve(sockets=[sock]))
    grpc_server = None
    if args.grpc_port:
        try:
            grpc_server = await grpc_service.start(service, args.host, args.grpc_port)
        except RuntimeError as err:
            print(f"error: cannot listen for gRPC on {args.grpc_port}: {err}", file=sys.stderr)
            stop()
            await http
            return 2
    try:
        await loop.run_in_executor(None, service.load)  # at start-up, not at import
    except (ArtifactError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        stop()
        await http
        return 2
    host, port = sock.getsockname()[:2]
    grpc_text = f" and grpc://{host}:{args.grpc_port}" if grpc_server else ""
    print(
        f"gala-serve: model {args.model_name!r} on {service.model.provider}, "
        f"max batch {args.max_batch} (warmed up {service.warmup['batch_sizes']} batch sizes in "
        f"{service.warmup['seconds']} s), listening on http://{host}:{port}{grpc_text}",
        flush=True,
    )
    await http
    if grpc_server is not None:
        await grpc_server.stop(grace=2)
    service.pool.shutdown(wait=False, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
