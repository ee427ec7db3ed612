"""The gRPC front: ``inference.GRPCInferenceService`` (Open Inference Protocol v2, as KServe and
Triton serve it) over the same batcher as HTTP.

The message and service definitions are the ones ``tritonclient.grpc`` ships, so a stock
``tritonclient.grpc.InferenceServerClient`` works unchanged: health, metadata, infer with typed
or raw contents. Outputs are always answered as ``raw_output_contents``, as Triton does. A bad
request ends with INVALID_ARGUMENT (NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED over a
limit, UNAVAILABLE while loading), never INTERNAL, which is kept for faults of the server and
logged with the request id.
"""

from __future__ import annotations

import logging
import time
import traceback

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gala_serve import protocol
from gala_serve.errors import RequestError, ServerFault

log = logging.getLogger("gala_serve")
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# Where each datatype's values sit in InferTensorContents.
CONTENTS = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "INT16": "int_contents",
    "INT8": "int_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
    "BYTES": "bytes_contents",
}


def to_request(request: pb.ModelInferRequest) -> protocol.InferRequest:
    """The transport-free request; :class:`RequestError` for anything malformed."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send raw data for "
            "every input or for none"
        )
    if not request.inputs:
        raise RequestError("request has no inputs")
    inputs = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in inputs:
            raise RequestError(f"input {name[:100]!r} appears twice")
        datatype = protocol.check_datatype(name, tensor.datatype)
        shape, count = protocol.check_shape(name, list(tensor.shape))
        if raw:
            inputs[name] = protocol.from_raw(name, datatype, shape, count, raw[i])
        elif datatype in CONTENTS:
            values = getattr(tensor.contents, CONTENTS[datatype])
            inputs[name] = protocol.from_values(name, datatype, shape, count, values)
        else:
            raise RequestError(f"input {name!r}: {datatype} travels only as raw_input_contents")
    outputs = [o.name for o in request.outputs] or None
    classify = {}
    for o in request.outputs:
        if "classification" in o.parameters:
            param = o.parameters["classification"]
            if param.WhichOneof("parameter_choice") != "int64_param":
                raise RequestError(f"output {o.name!r} parameters: 'classification' must be int64")
            classify[o.name] = protocol.class_count(o.name, param.int64_param)
    return protocol.InferRequest(request.id or None, inputs, outputs, set(), False, classify)


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service) -> None:
        self.service = service

    async def _call(self, endpoint: str, context, fn):
        """``await fn()`` with errors turned into status codes, and metrics kept."""
        start, code = time.perf_counter(), None
        try:
            return await fn()
        except RequestError as err:
            code = CODES.get(err.status, grpc.StatusCode.INVALID_ARGUMENT)
            message = str(err)
            if err.retry_after is not None:  # gRPC's own form of Retry-After
                pushback = str(1000 * err.retry_after)
                context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
        except Exception as err:  # a fault of the server: INTERNAL, logged, and keep serving
            request_id = dict(context.invocation_metadata() or ()).get("x-request-id", "-")
            log.error("gRPC %s %s failed:\n%s", endpoint, request_id, traceback.format_exc())
            what = str(err) if isinstance(err, ServerFault) else type(err).__name__
            code, message = grpc.StatusCode.INTERNAL, f"internal error ({what})"
        finally:
            self.service.metrics.request(
                endpoint, "grpc", time.perf_counter() - start, code and code.name
            )
        await context.abort(code, message)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.not_ready() is None)

    async def ModelReady(self, request, context):
        async def answer():
            self.service.check_model(request.name)
            return pb.ModelReadyResponse(ready=self.service.not_ready() is None)

        return await self._call("model_ready", context, answer)

    async def ServerMetadata(self, request, context):
        doc = self.service.server_metadata()
        return pb.ServerMetadataResponse(
            name=doc["name"], version=doc["version"], extensions=doc["extensions"]
        )

    async def ModelMetadata(self, request, context):
        async def answer():
            svc = self.service
            svc.check_model(request.name)
            svc.ticket().withdraw()  # 503 while loading
            doc = svc.metadata()

            def tensors(entries):
                return [
                    pb.ModelMetadataResponse.TensorMetadata(
                        name=t["name"], datatype=t["datatype"], shape=t["shape"]
                    )
                    for t in entries
                ]

            return pb.ModelMetadataResponse(
                name=doc["name"],
                versions=doc["versions"],
                platform=doc["platform"],
                inputs=tensors(doc["inputs"]),
                outputs=tensors(doc["outputs"]),
            )

        return await self._call("model_metadata", context, answer)

    async def ModelInfer(self, request, context):
        async def answer():
            svc = self.service
            svc.check_model(request.model_name)
            ticket = svc.ticket()
            try:
                parsed = to_request(request)
                outputs = await svc.infer(parsed, ticket)
            finally:
                ticket.withdraw()
            names = protocol.select_outputs(parsed, outputs)
            arrays = [outputs[n] for n in names]
            return pb.ModelInferResponse(
                model_name=svc.args.model_name,
                model_version="1",
                id=request.id,
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(
                        name=n, datatype=protocol.NAMES[a.dtype], shape=list(a.shape)
                    )
                    for n, a in zip(names, arrays, strict=True)
                ],
                raw_output_contents=[protocol.to_raw(a) for a in arrays],
            )

        return await self._call("infer", context, answer)


async def start(service, host: str, port: int) -> grpc.aio.Server:
    """A started gRPC server on ``host:port``; RuntimeError when the port cannot be bound."""
    a = service.args
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", a.max_body_bytes),
            ("grpc.max_send_message_length", -1),
        ],
        maximum_concurrent_rpcs=a.max_connections,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(service), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    return server
