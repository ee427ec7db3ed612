"""The peer server of ``python -m gala_serve_bench``: MLServer serving gala-scale's exported
ONNX graph with ONNX Runtime, the way an MLServer user would (MLServer ships no ONNX runtime:
this is its custom-runtime interface). Loaded by MLServer from this folder, in its own venv
(tools/mlserver_venv.sh); nothing of gala-serve is imported."""

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxPeer(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        threads = int(self.settings.parameters.extra.get("threads", 0))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self.all_outputs = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        names = [o.name for o in payload.outputs] if payload.outputs else self.all_outputs
        arrays = self.session.run(names, {payload.inputs[0].name: x})
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, a) for n, a in zip(names, arrays, strict=True)],
        )
