"""Export and the real gala-serve server on 127.0.0.1, with the real gala-batch client."""

import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from gala_serve import preprocess
from gala_serve.batch import main as batch_main
from gala_serve.batch import transductive_predictions
from gala_serve.client import Client, ServerError
from PIL import Image
from safetensors.torch import load_file
from train_helpers import ENV, GPU_ENV, explain, run_module

from gala_scale.data import presets
from gala_scale.models import create_model
from gala_scale.serving import serving
from gala_scale.shards import tario

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def trained(synthetic_shards, trained_run):
    return synthetic_shards, trained_run


@contextlib.contextmanager
def running_server(artifact: Path, log: Path, *flags: str, env: dict = ENV):
    """A gala-serve process on free ports (gala_scale.serving); yields a client once ready."""
    from conftest import free_port

    ready = False
    with open(log, "w") as out:
        try:
            with serving(
                artifact, *flags, grpc=True, log=out, env=env, ready_s=120, ports=free_port
            ) as server:
                ready = True
                client = Client(server.url, retries=0)
                client.grpc_port, client.log = int(server.grpc.rpartition(":")[2]), log
                yield client
        except (TimeoutError, RuntimeError):
            if ready:
                raise
            raise AssertionError(log.read_text()) from None


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    flags = ["--max-batch", "16", "--max-delay-ms", "5", "--max-body-bytes", "2000000"]
    flags += ["--max-image-pixels", "1000000", "--max-request-batch", "64", "--providers", "cpu"]
    flags += ["--idle-timeout", "2", "--request-timeout", "3"]
    with running_server(artifact, tmp_path_factory.mktemp("log") / "server.log", *flags) as c:
        yield c


def sample_images(trained, count: int = 8) -> list[tuple[bytes, int]]:
    shards, _ = trained
    manifest = json.loads((shards / "manifest.json").read_text())
    tar = shards / manifest["splits"]["test"]["shards"][0]["file"]
    return [(files["jpg"], int(files["cls"])) for _, files in list(tario.iter_tar(tar))[:count]]


def torch_model(run_dir: Path) -> torch.nn.Module:
    model = create_model("tiny", num_classes=6)
    model.load_state_dict(load_file(run_dir / "best" / "model.safetensors"))
    return model.eval()


@pytest.mark.slow
def test_export_artifact(trained, artifact):
    _, run_dir = trained
    onnx.checker.check_model(str(artifact / "model.onnx"), full_check=True)
    doc = json.loads((artifact / "artifact.json").read_text())
    assert doc["check"]["max_abs_logit_diff"] < 1e-4 and doc["check"]["images"] == 64
    if not torch.cuda.is_available():
        assert doc["check"]["cuda"] == {"skipped": "no CUDA device"}
    pn = json.loads((run_dir / "pn.json").read_text())
    assert doc["rebalance"]["scales"] == pn["scales"] and doc["rebalance"]["tau"] == 1.0
    assert doc["preprocess"]["mean"] == list(presets.CIFAR_MEAN) and len(doc["class_names"]) == 6
    assert doc["check"]["max_abs_probability_diff"] < 1e-5
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [
        "logits",
        "raw_probabilities",
        "probabilities",
    ]
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    got = session.run(None, {"input": x})[0]  # a batch size never seen at export: dynamic axis
    want = torch_model(run_dir)(torch.from_numpy(x)).detach().numpy()
    assert np.abs(got - want).max() < 1e-4
    triton = artifact / "triton" / "gala"
    assert (triton / "1" / "model.onnx").is_file()
    config = (triton / "config.pbtxt").read_text()
    assert "dynamic_batching" in config
    assert all(f'name: "{o}"' in config for o in ("logits", "raw_probabilities", "probabilities"))


@pytest.mark.slow
def test_exported_graph_applies_the_stored_pn_itself(trained, artifact):
    """Plain ONNX Runtime, no wrapper: the graph's outputs on real images are the softmax and
    rebalance.apply of the torch model's logits with the artifact's scales and tau."""
    from gala_scale import rebalance

    _, run_dir = trained
    pre = presets.get_preset("cifar")
    x = np.stack(
        [presets.eval_array(Image.open(io.BytesIO(d)), pre) for d, _ in sample_images(trained, 8)]
    )
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, raw, adjusted = session.run(None, {"input": x})
    doc = json.loads((artifact / "artifact.json").read_text())["rebalance"]
    with torch.no_grad():
        want_logits = torch_model(run_dir)(torch.from_numpy(x)).double()
    want_raw = torch.softmax(want_logits, 1).numpy()
    want = rebalance.apply(want_raw, np.asarray(doc["scales"]), doc["tau"])
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(raw, want_raw, atol=1e-5)
    np.testing.assert_allclose(adjusted, want, atol=1e-5)
    assert not np.allclose(adjusted, raw, atol=1e-3)  # the scales do change the answer


@pytest.mark.slow
def test_server_preprocessing_is_the_training_eval_preset(trained):
    pre = presets.get_preset("imagenet").to_dict()
    rng = np.random.default_rng(1)
    for w, h in ((300, 260), (257, 411), (256, 256)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        np.testing.assert_array_equal(
            preprocess.eval_array(img, pre), presets.eval_array(img, presets.get_preset("imagenet"))
        )
    for data, _ in sample_images(trained, 4):
        img = Image.open(io.BytesIO(data))
        np.testing.assert_array_equal(
            preprocess.eval_array(img, presets.get_preset("cifar").to_dict()),
            presets.eval_array(img, presets.get_preset("cifar")),
        )


@pytest.mark.slow
def test_health_and_metadata(server):
    assert server.json("GET", "/v2/health/live") == {"live": True}
    assert server.json("GET", "/v2/health/ready") == {"ready": True}
    assert {"binary_tensor_data", "classification"} <= set(server.json("GET", "/v2")["extensions"])
    meta = server.json("GET", "/v2/models/gala")
    assert meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    params = meta["parameters"]
    assert params["provider"] == "CPUExecutionProvider" and params["provider_requested"] == "cpu"
    assert params["provider_fallback"] is None
    assert params["warmup"]["batch_sizes"] == 2  # 1 and --max-batch on the CPU provider
    assert server.json("GET", "/v2/models/gala/ready")["ready"] is True
    metrics = server.request("GET", "/metrics")[2].decode()
    assert "# TYPE gala_serve_provider gauge" in metrics
    assert (
        'gala_serve_provider{fallback="false",provider="CPUExecutionProvider",requested="cpu"} 1.0'
        in metrics
    )


def _infer_json(server, x: np.ndarray) -> dict:
    doc = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    return {
        o["name"]: np.array(o["data"]).reshape(o["shape"])
        for o in server.json("POST", "/v2/models/gala/infer", doc)["outputs"]
    }


@pytest.mark.slow
def test_answers_equal_onnx_runtime_and_torch(server, trained, artifact):
    _, run_dir = trained
    pre = presets.get_preset("cifar")
    images = sample_images(trained, 8)
    x = np.stack([presets.eval_array(Image.open(io.BytesIO(d)), pre) for d, _ in images])
    out = _infer_json(server, x)
    want = torch_model(run_dir)(torch.from_numpy(x)).detach().numpy()
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out["logits"], session.run(None, {"input": x})[0], atol=1e-6)
    np.testing.assert_allclose(out["logits"], want, atol=1e-4)
    scales = np.array(json.loads((artifact / "artifact.json").read_text())["rebalance"]["scales"])
    raw = torch.softmax(torch.from_numpy(want), 1).numpy()
    expected = raw / scales / (raw / scales).sum(1, keepdims=True)
    np.testing.assert_allclose(out["raw_probabilities"], raw, atol=1e-5)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    for (data, _), row in zip(images, out["probabilities"], strict=True):
        answer = server.classify(data, top_k=3, full=True)
        assert answer["top_k"][0]["index"] == int(row.argmax())
        np.testing.assert_allclose(answer["probabilities"], row, atol=1e-5)


@pytest.mark.slow
def test_binary_tensor_extension(server):
    x = np.random.default_rng(2).normal(size=(3, 3, 32, 32)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 3, 32, 32],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = server.request(
        "POST",
        "/v2/models/gala/infer",
        header + x.tobytes(),
        {
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert status == 200
    length = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:length])["outputs"][0]
    probs = np.frombuffer(body[length:], dtype="<f4").reshape(meta["shape"])
    np.testing.assert_allclose(probs, _infer_json(server, x)["probabilities"], atol=1e-6)


def _jpeg(size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(out, format="JPEG")
    return out.getvalue()


BAD = {
    "not an image": ("/v1/classify", b"plain text", {}, 400, "could not be decoded"),
    "truncated JPEG": ("/v1/classify", _jpeg((64, 64))[:200], {}, 400, "could not be decoded"),
    "empty image": ("/v1/classify", b"", {}, 400, "empty"),
    "too many pixels": ("/v1/classify", _jpeg((1200, 1000)), {}, 413, "pixels"),
    "body too large": ("/v1/classify", b"x" * 2_000_001, {}, 413, "exceeds the limit"),
    "bad base64": (
        "/v2/models/gala/infer",
        b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}',
        {"Content-Type": "application/json"},
        400,
        "base64",
    ),
    "not JSON": ("/v2/models/gala/infer", b"{nope", {}, 400, "not valid JSON"),
    "wrong dtype": (
        "/v2/models/gala/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "INT32",
                        "data": [0] * 3072,
                    }
                ]
            }
        ).encode(),
        {},
        400,
        "must be FP32",
    ),
    "wrong shape": (
        "/v2/models/gala/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 16, 16],
                        "datatype": "FP32",
                        "data": [0.0] * 768,
                    }
                ]
            }
        ).encode(),
        {},
        400,
        "must have shape",
    ),
    "data count": (
        "/v2/models/gala/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 32, 32],
                        "datatype": "FP32",
                        "data": [0.0] * 7,
                    }
                ]
            }
        ).encode(),
        {},
        400,
        "7 values",
    ),
    "empty batch": (
        "/v2/models/gala/infer",
        json.dumps(
            {"inputs": [{"name": "input", "shape": [0, 3, 32, 32], "datatype": "FP32", "data": []}]}
        ).encode(),
        {},
        400,
        "N>0",
    ),
    "batch too large": (
        "/v2/models/gala/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [65, 3, 32, 32],
                        "datatype": "FP32",
                        "data": [0.0] * (65 * 3072),
                    }
                ]
            }
        ).encode(),
        {},
        413,
        "limit is 64",
    ),
    "unknown model": ("/v2/models/other/infer", b"{}", {}, 404, "unknown model"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, case):
    path, body, headers, status, message = BAD[case]
    got, _, data = server.request("POST", path, body, headers)
    assert got == status, data
    assert message in json.loads(data)["error"]
    assert server.classify(_jpeg())["top_k"]  # the next good request succeeds


def _raw(server, data: bytes) -> list[bytes]:
    """Send raw bytes on one connection; the answers' status lines, until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    statuses = []
    while received:
        head, _, received = received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        statuses.append(lines[0])
        length = [int(x.split(b":")[1]) for x in lines if x.lower().startswith(b"content-length")]
        received = received[length[0] if length else 0 :]
    return statuses


RAW = {
    # two pipelined requests on one keep-alive connection, both answered in order
    "keep-alive": (
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/nope HTTP/1.1\r\nHost: x\r\n\r\n",
        [b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"],
    ),
    "HTTP/1.0 closes": (
        b"GET /v2/health/live HTTP/1.0\r\n\r\nGET /v2/health/live HTTP/1.0\r\n\r\n",
        [b"HTTP/1.1 200 OK"],
    ),
    "bad request line": (b"HELLO\r\n\r\n", [b"HTTP/1.1 400 Bad Request"]),
    "bad header": (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", [b"HTTP/1.1 400 Bad Request"]),
    "head too large": (
        b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        [b"HTTP/1.1 431 Request Header Fields Too Large"],
    ),
    # a chunked body is read (and here is not an image)
    "chunked": (
        b"POST /v1/classify HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n",
        [b"HTTP/1.1 400 Bad Request"],
    ),
    "negative length": (
        b"POST /v1/classify HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        [b"HTTP/1.1 400 Bad Request"],
    ),
    "no length": (b"POST /v1/classify HTTP/1.1\r\n\r\n", [b"HTTP/1.1 400 Bad Request"]),
    "expect 100-continue": (
        b"POST /v2/models/gala/infer HTTP/1.1\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n{nope",
        [b"HTTP/1.1 100 Continue", b"HTTP/1.1 400 Bad Request"],
    ),
    "unread body of a GET is skipped": (
        b"GET /v2/health/live HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /v2/health/ready HTTP/1.1\r\n\r\n",
        [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"],
    ),
}


@pytest.mark.slow
def test_idle_keep_alive_connections_are_closed(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        start = time.perf_counter()
        assert sock.recv(100) == b""  # the server closed it (--idle-timeout 2)
        assert 1.5 < time.perf_counter() - start < 8
    assert server.json("GET", "/v2/health/live") == {"live": True}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RAW))
def test_http_framing_edge_cases(server, case):
    data, expected = RAW[case]
    assert _raw(server, data) == expected
    assert server.json("GET", "/v2/health/live") == {"live": True}  # still serving


@pytest.mark.slow
def test_concurrent_clients_all_answered_correctly(server, trained):
    images = sample_images(trained, 8)
    expected = [server.classify(d)["top_k"][0]["index"] for d, _ in images]
    errors, results = [], {}

    def client(n: int) -> None:
        try:
            for i in range(6):
                data, _ = images[(n + i) % len(images)]
                results[(n, i)] = (
                    server.classify(data)["top_k"][0]["index"] == expected[(n + i) % len(images)]
                )
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 96 and all(results.values())
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'gala_requests_total{endpoint="classify",protocol="http"}' in metrics
    assert "gala_batch_size_bucket" in metrics and "gala_request_errors_total" in metrics


@pytest.mark.slow
def test_batch_client_reproduces_the_trainer_accuracy_with_pn(server, trained, tmp_path, capsys):
    """gala-batch sends the encoded images through tritonclient (HTTP, then gRPC) and gets the
    trainer's own PN accuracy for the same weights, stored and transductive."""
    shards, run_dir = trained
    url = f"http://{server.host}:{server.port}"
    expected = json.loads((run_dir / "results.json").read_text())["test"]
    for flag, key in (
        ([], "PN, val scales, tau 1"),
        (["--transductive"], "PN, transductive on test, tau 1"),
        (["--grpc", f"127.0.0.1:{server.grpc_port}"], "PN, val scales, tau 1"),
    ):
        out = tmp_path / "preds.jsonl"
        args = ["--server", url, "--input", str(shards), "--out", str(out), "--concurrency", "4"]
        assert batch_main([*args, *flag]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert float(summary["top1"].rstrip("%")) == pytest.approx(
            100 * expected[key]["top1"], abs=0.01
        )
        assert summary["protocol"] == ("grpc" if "--grpc" in flag else "http")
        assert summary["peak_rss_mib"] > 0
        assert not list(tmp_path.glob(".preds.jsonl*")), "temporary files are left"
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(lines) == 120 and lines[0]["id"].startswith("test_")
        assert all(x["pred_class"] == f"class_{x['pred']:03d}" for x in lines)


def test_transductive_predictions_read_in_chunks_equal_the_whole_matrix(tmp_path):
    """The transductive PN of gala-batch reads a memory map of the raw probabilities a few rows
    at a time; chunk boundaries (here 3 rows) must not change any prediction."""
    rng = np.random.default_rng(0)
    raw = rng.dirichlet(np.full(7, 0.3), size=10).astype(np.float32)
    raw[:, 0] *= 5  # a head class that the column normalisation must pull down
    raw /= raw.sum(1, keepdims=True)
    path = tmp_path / "raw.f32"
    path.write_bytes(raw.tobytes())
    mapped = np.memmap(path, np.float32, "r", shape=raw.shape)
    for tau in (0.0, 0.5, 1.0):
        whole = (raw / raw.sum(0, dtype=np.float64) ** tau).argmax(1)
        np.testing.assert_array_equal(transductive_predictions(mapped, tau, rows=3), whole)
    assert (transductive_predictions(mapped, 1.0) != raw.argmax(1)).any()


@pytest.mark.slow
def test_json_images_and_unreachable_server(server, trained):
    images = [base64.b64encode(d).decode() for d, _ in sample_images(trained, 3)]
    tensor = {"name": "image", "shape": [3], "datatype": "BYTES", "data": images}
    doc = server.json("POST", "/v2/models/gala/infer", {"inputs": [tensor]})
    probs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
    assert probs["probabilities"].shape == (3, 6)
    first = server.classify(base64.b64decode(images[0]), top_k=2, full=True)
    np.testing.assert_allclose(first["probabilities"], probs["probabilities"][0], atol=1e-6)
    names = server.json("GET", "/v2/models/gala")["parameters"]["class_names"]
    top = first["top_k"][0]
    assert len(first["top_k"]) == 2 and top["class"] == names[top["index"]]
    with pytest.raises(ServerError, match="404"):
        server.json("GET", "/v2/models/nope")
    dead = Client("http://127.0.0.1:9", retries=1, backoff=0.01)
    with pytest.raises(OSError):
        dead.json("GET", "/v2/health/live")
    assert dead.retried == 1


def test_batcher_groups_announced_requests_and_never_delays_a_lone_one():
    import asyncio

    from gala_serve.batcher import DynamicBatcher

    sizes = []
    batcher = DynamicBatcher(
        lambda x: (sizes.append(len(x)), x * 2)[1], max_batch=8, max_delay_s=1.0
    )

    async def one(i: int) -> np.ndarray:
        await asyncio.sleep(0.01 * i)  # requests arrive one after another
        batcher.expect(-1)
        return await batcher.infer(np.full((1, 2), float(i)))

    async def main() -> None:
        start = time.perf_counter()
        np.testing.assert_array_equal(await batcher.infer(np.ones((1, 2))), np.full((1, 2), 2.0))
        assert time.perf_counter() - start < 0.5  # nobody else announced: no wait
        for _ in range(6):
            batcher.expect(+1)
        outputs = await asyncio.gather(*(one(i) for i in range(6)))
        assert all(np.array_equal(outputs[i], np.full((1, 2), 2.0 * i)) for i in range(6))
        assert sizes[1:] == [6]  # the announced requests made one batch
        split = await batcher.infer(np.arange(20.0).reshape(10, 2))
        np.testing.assert_array_equal(split, np.arange(20.0).reshape(10, 2) * 2)
        assert sizes[2:] == [8, 2]  # cut at max_batch

    asyncio.run(main())


def test_batcher_serves_coroutines_and_passes_model_errors_on():
    import asyncio

    from gala_serve.batcher import DynamicBatcher

    sizes = []

    def run(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise RuntimeError("model failed")
        sizes.append(len(x))
        return x * 2

    batcher = DynamicBatcher(run, max_batch=4, max_delay_s=0.05)

    async def main() -> list:
        calls = [batcher.infer(np.full((1 + i % 3, 2), float(i))) for i in range(8)]
        return await asyncio.gather(*calls)

    for i, out in enumerate(asyncio.run(main())):
        np.testing.assert_array_equal(out, np.full((1 + i % 3, 2), 2.0 * i))
    assert sum(sizes) == sum(1 + i % 3 for i in range(8)) and max(sizes) <= 4
    with pytest.raises(RuntimeError, match="model failed"):
        asyncio.run(batcher.infer(-np.ones((6, 2))))  # two pieces; the error reaches the caller


@pytest.mark.slow
def test_serve_benchmark_prints_its_measurements_as_json_last(artifact):
    args = ["--artifact", str(artifact), "--seconds", "0.3", "--rounds", "2", "--levels", "1", "4"]
    proc = run_module("gala_serve_bench", *args, "--client-procs", "2", "--providers", "cpu")
    assert proc.returncode == 0, explain(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["provider"] == "CPUExecutionProvider" and set(result["levels"]) == {"1", "4"}
    for row in result["levels"].values():
        for target in ("gala_json", "gala_binary", "gala_grpc", "gala_max_batch_1"):
            assert row[target]["requests"] > 0 and row[target]["p99_ms"] >= row[target]["p50_ms"]
        assert row["dynamic_over_max_batch_1"]["throughput"] > 0
        assert "json_over_peer" not in row  # no --peer-python
    assert set(result["peak_rss_mib"]) == {"dynamic", "max_batch_1"}
    assert result["model_alone"]["batch_gain"] > 0
    assert result["ort_vs_torch_cpu"]["batch64"]["ort_speedup"] > 0
    assert "ort_vs_torch_cuda" not in result  # only when the servers run on CUDA


def test_the_server_wheel_holds_gala_serve_and_not_the_benchmark():
    """serve/pyproject.toml's package discovery, as setuptools runs it, takes gala_serve and
    nothing of the benchmark (serve/bench), even were it beside gala_serve."""
    import importlib.util

    import setuptools

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    serve = Path(__file__).resolve().parents[1] / "serve"
    find = tomllib.loads((serve / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = find["packages"]["find"]
    assert find.get("namespaces", True) and find.get("where", ["."]) == ["."], find

    def discover(where: Path) -> list[str]:
        exclude, include = find.get("exclude", ()), find["include"]
        return setuptools.find_namespace_packages(str(where), exclude=exclude, include=include)

    packages = discover(serve)
    assert "gala_serve" in packages, packages
    assert all(p.split(".")[0] == "gala_serve" for p in packages), packages
    assert discover(serve / "bench") == []  # the pattern takes no gala_serve_bench
    modules = {p.stem for p in (serve / "gala_serve").glob("*.py")}
    assert {"app", "web", "uvicorn_protocol", "batch", "sources", "records"} <= modules
    assert "bench" not in modules and importlib.util.find_spec("gala_serve.bench") is None


@pytest.mark.slow
@pytest.mark.gpu
def test_export_compares_onnx_runtime_on_cuda_with_torch(artifact):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    doc = json.loads((artifact / "artifact.json").read_text())
    assert doc["check"]["cuda"]["max_abs_logit_diff"] < 5e-2


@pytest.mark.slow
@pytest.mark.gpu
def test_cuda_provider_serves_the_same_answers(artifact, tmp_path):
    log = tmp_path / "server.log"
    with running_server(artifact, log, "--providers", "cuda", env=GPU_ENV) as client:
        meta = client.json("GET", "/v2/models/gala")
        assert meta["parameters"]["provider"] == "CUDAExecutionProvider", log.read_text()
        x = np.random.default_rng(5).normal(size=(4, 3, 32, 32)).astype(np.float32)
        cpu = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
        want = cpu.run(None, {"input": x})[0]
        np.testing.assert_allclose(_infer_json(client, x)["logits"], want, atol=1e-3)


AUTO_ON_A_BROKEN_GPU = """
import json, sys
from gala_serve import app, model
model._gpu_present = lambda: True  # as on a GPU machine
args = app.parse_args(["--artifact", sys.argv[1], "--device-id", "99", "--max-batch", "4"])
service = app.Service(args)
service.load()
print(json.dumps({"meta": service.metadata(), "metrics": service.metrics.render().decode()}))
"""


@pytest.mark.slow
def test_auto_provider_that_cannot_start_cuda_says_so_loudly(artifact):
    """auto asks for CUDA on a machine that looks like it has a GPU (a device id no machine
    has, so the CUDA provider fails everywhere): the CPU serves, and it is said three ways.
    In a process of its own: a failed CUDA start must not leave its threads in the test's."""
    proc = subprocess.run(
        [sys.executable, "-c", AUTO_ON_A_BROKEN_GPU, str(artifact)],
        capture_output=True,
        text=True,
        env=GPU_ENV,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: --providers auto: the CUDA provider" in proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    params = found["meta"]["parameters"]
    assert params["provider"] == "CPUExecutionProvider" and params["provider_requested"] == "auto"
    assert "CUDA provider" in params["provider_fallback"]
    assert (
        'gala_serve_provider{fallback="true",provider="CPUExecutionProvider",requested="auto"} 1.0'
        in found["metrics"]
    )


def test_warmup_runs_every_batch_size_the_batcher_can_form_on_a_gpu():
    from gala_serve.app import warmup_sizes

    assert warmup_sizes("auto", "CUDAExecutionProvider", 64) == list(range(1, 65))
    assert warmup_sizes("auto", "CPUExecutionProvider", 64) == [1, 64]
    assert warmup_sizes("all", "CPUExecutionProvider", 3) == [1, 2, 3]
    assert warmup_sizes("none", "CUDAExecutionProvider", 64) == []


@pytest.mark.slow
def test_startup_errors_exit_2_and_say_why(artifact, tmp_path):
    def start(*args: str) -> subprocess.CompletedProcess:
        cmd = [str(BIN / "gala-serve"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)

    missing = start("--artifact", str(tmp_path / "nowhere"), "--port", "0")
    assert missing.returncode == 2 and "artifact.json: missing" in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = start("--artifact", str(artifact), "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "cannot listen on 127.0.0.1" in busy.stderr
    cuda = start("--artifact", str(artifact), "--port", "0", "--providers", "cuda")  # GPUs hidden
    assert cuda.returncode == 2 and "--providers cuda: the CUDA provider" in cuda.stderr


# --- hostile clients -------------------------------------------------------------------------


def _send(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Raw bytes on a fresh connection; whatever comes back until the server closes or, after
    the first answer, goes quiet for a moment. Bounded by ``timeout``."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"\r\n\r\n" in received:
                sock.settimeout(0.3)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
    return head + b"\r\n" + extra + b"\r\n" + body


def _image(fmt: str, size=(16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size).save(out, format=fmt)
    return out.getvalue()


INFER = b"/v2/models/gala/infer"
INFER_HEAD = b"POST /v2/models/gala/infer HTTP/1.1\r\nHost: x\r\n"
HOSTILE = {
    # each: raw request, expected status line, a word of the error
    "invalid JSON": (_post(INFER, b"{nope"), 400, b"not valid JSON"),
    "non-numeric binary header length": (
        _post(INFER, b"{}", b"Inference-Header-Content-Length: 12a\r\n"),
        400,
        b"not a byte count",
    ),
    "parameters a list": (
        _post(
            INFER,
            b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1]}], '
            b'"parameters": [1]}',
        ),
        400,
        b"'parameters' must be dict",
    ),
    "input name a list": (
        _post(INFER, b'{"inputs": [{"name": ["a"], "shape": [1], "datatype": "FP32"}]}'),
        400,
        b"'name' must be str",
    ),
    "shape overflowing int64": (
        _post(
            INFER,
            b'{"inputs": [{"name": "input", "datatype": "FP32", "data": [1], '
            b'"shape": [4294967296, 4294967296, 4294967296]}]}',
        ),
        413,
        b"elements",
    ),
    "5,000-digit number": (
        _post(
            INFER,
            b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ['
            + b"7" * 5000
            + b"]}]}",
        ),
        400,
        b"not valid JSON",
    ),
    "5,000-digit Content-Length": (
        INFER_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n{}",
        400,
        b"Content-Length",
    ),
    "two Content-Length headers": (
        INFER_HEAD + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}",
        400,
        b"Duplicate Content-Length",
    ),
    "chunked then identity": (
        INFER_HEAD + b"Transfer-Encoding: chunked, identity\r\nContent-Length: 2\r\n\r\n{}",
        400,
        b"Transfer-Encoding",
    ),
    "Transfer-Encoding beside Content-Length": (
        INFER_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        400,
        b"Transfer-Encoding",
    ),
    "TIFF image": (_post(b"/v1/classify", _image("TIFF")), 400, b"JPEG/PNG/WEBP"),
    "BMP image": (_post(b"/v1/classify", _image("BMP")), 400, b"JPEG/PNG/WEBP"),
    "EPS image": (
        _post(b"/v1/classify", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
        400,
        b"JPEG/PNG/WEBP",
    ),
    "top_k not a number": (_post(b"/v1/classify?top_k=1e9", _jpeg()), 400, b"top_k"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_requests_get_4xx_and_the_server_keeps_serving(server, case):
    data, status, word = HOSTILE[case]
    answer = _send(server.port, data)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    assert word in answer, answer[:500]
    assert server.classify(_jpeg())["top_k"]
    assert b"Traceback" not in server.log.read_bytes()


@pytest.fixture(scope="module")
def patient_server(artifact, tmp_path_factory):
    """A server whose batcher would wait 2 s for announced requests, with a 2 s request
    deadline and room for 12 connections: stalled clients would show at once."""
    flags = ["--max-batch", "16", "--max-delay-ms", "2000", "--providers", "cpu"]
    flags += ["--request-timeout", "2", "--max-connections", "12"]
    with running_server(artifact, tmp_path_factory.mktemp("log") / "server.log", *flags) as c:
        yield c


def _binary_infer(client, rows: int = 1) -> float:
    """Seconds for one binary-tensor infer request of ``rows`` samples."""
    x = np.zeros((rows, 3, 32, 32), np.float32)
    spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    header = json.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": x.nbytes}}]})
    start = time.perf_counter()
    status, _, data = client.request(
        "POST",
        "/v2/models/gala/infer",
        header.encode() + x.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )
    assert status == 200, data
    return time.perf_counter() - start


@pytest.mark.slow
def test_stalled_clients_are_cut_and_never_hold_a_batch(patient_server):
    """Six clients send a head and 2 bytes of a 100-byte body, then stall. A fast client's
    requests are not held by them (an announced stalled request would make each batch wait
    --max-delay-ms, 2 s), and each stalled client gets a 408 after --request-timeout."""
    slow = []
    for _ in range(6):
        sock = socket.create_connection(("127.0.0.1", patient_server.port), timeout=15)
        sock.sendall(INFER_HEAD + b'Content-Length: 100\r\n\r\n{"')
        slow.append(sock)
    try:
        times = sorted(_binary_infer(patient_server) for _ in range(20))
        assert times[-1] < 1.0, times  # p99 of 20, well under the 2 s a held batch would take
        for sock in slow:
            start = time.monotonic()
            answer = sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert time.monotonic() - start < 10
    finally:
        for sock in slow:
            sock.close()
    metrics = patient_server.request("GET", "/metrics")[2].decode()
    assert "gala_request_timeouts_total 6.0" in metrics


@pytest.mark.slow
def test_connection_cap_is_answered_503(patient_server):
    idle = [socket.create_connection(("127.0.0.1", patient_server.port)) for _ in range(11)]
    try:
        time.sleep(0.2)  # the server has accepted them
        answer = _send(patient_server.port, b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"open connections" in answer
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while _send(patient_server.port, b"GET /v2/health/live HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 503"
    ):
        assert time.monotonic() < deadline, "the cap never freed"
        time.sleep(0.1)


def test_images_are_bounded_after_the_resize_and_by_format():
    pre = presets.get_preset("imagenet").to_dict()
    sliver = _image("PNG", (10_000, 1))  # a few hundred bytes, 10,000 pixels
    assert len(sliver) < 1000
    with pytest.raises(preprocess.TooLarge, match=r"resized to 2560000x256"):
        preprocess.decode(sliver, 40_000_000, "image 0", preprocess.FORMATS, pre, 4_000_000)
    ok = preprocess.decode(_image("PNG", (500, 375)), 40_000_000, "x", preprocess.FORMATS, pre, 4e6)
    assert preprocess.eval_array(ok, pre).shape == (3, 224, 224)
    for fmt in ("TIFF", "BMP", "GIF"):
        with pytest.raises(preprocess.RequestError, match="JPEG/PNG/WEBP"):
            preprocess.decode(_image(fmt), 40_000_000)
    cifar = presets.get_preset("cifar").to_dict()  # resizes any size to 32x32: no blow-up
    preprocess.decode(sliver, 40_000_000, "image 0", preprocess.FORMATS, cifar, 4_000_000)


# --- gRPC and the stock Triton clients --------------------------------------------------------


@pytest.mark.slow
def test_stock_triton_clients_over_grpc_and_http(server, trained):
    """tritonclient, unchanged: health, metadata, FP32 tensors and encoded images (BYTES), as
    binary data; both protocols give the HTTP JSON route's answer."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    images = [d for d, _ in sample_images(trained, 4)]
    pre = presets.get_preset("cifar")
    x = np.stack([presets.eval_array(Image.open(io.BytesIO(d)), pre) for d in images])
    want = _infer_json(server, x)["probabilities"]
    for tc, url in (
        (tgrpc, f"127.0.0.1:{server.grpc_port}"),
        (thttp, f"127.0.0.1:{server.port}"),
    ):
        client = tc.InferenceServerClient(url)
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("gala")
        meta = client.get_model_metadata("gala")
        inputs = meta["inputs"] if tc is thttp else [{"name": i.name} for i in meta.inputs]
        assert [i["name"] for i in inputs] == ["input", "image"]
        tensor = tc.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("gala", [tensor]).as_numpy("probabilities")
        np.testing.assert_allclose(got, want, atol=1e-6)
        encoded = tc.InferInput("image", [len(images)], "BYTES")
        encoded.set_data_from_numpy(np.array(images, dtype=object))
        asked = [tc.InferRequestedOutput("probabilities"), tc.InferRequestedOutput("logits")]
        result = client.infer("gala", [encoded], outputs=asked)
        np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)
        assert result.as_numpy("raw_probabilities") is None  # only what was asked for
        # The classification extension: each row's top 3 as "value:index:class name".
        top3 = tc.InferRequestedOutput("probabilities", class_count=3)
        labels = client.infer("gala", [encoded], outputs=[top3]).as_numpy("probabilities")
        assert labels.shape == (len(images), 3)
        for row, answer in zip(want, labels, strict=True):
            parts = [x.decode().split(":") for x in answer]
            indices = [int(i) for _, i, _ in parts]
            assert indices == list(np.argsort(-row, kind="stable")[:3])
            assert [name for _, _, name in parts] == [f"class_{i:03d}" for i in indices]
            np.testing.assert_allclose([float(v) for v, _, _ in parts], row[indices], atol=1e-5)
        bad = tc.InferInput("input", [1, 3, 16, 16], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
        with pytest.raises(InferenceServerException, match="must have shape"):
            client.infer("gala", [bad])
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("other", [tensor])
    for bad_count in (0, -2, "3", 1.5, True):
        doc = {
            "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["eA=="]}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": bad_count}}],
        }
        status, _, body = server.request("POST", "/v2/models/gala/infer", json.dumps(doc).encode())
        assert status == 400 and b"classification" in body, (bad_count, body)
    doc["outputs"][0]["parameters"]["classification"] = 10_000  # more than K: every class
    doc["inputs"][0]["data"] = [base64.b64encode(images[0]).decode()]
    answer = server.json("POST", "/v2/models/gala/infer", doc)["outputs"][0]
    assert answer["datatype"] == "BYTES" and answer["shape"] == [1, 6]
    assert sorted(int(x.split(":")[1]) for x in answer["data"]) == list(range(6))
    metrics = server.request("GET", "/metrics")[2].decode()
    assert 'gala_requests_total{endpoint="infer",protocol="grpc"}' in metrics
    assert 'code="INVALID_ARGUMENT",endpoint="infer",protocol="grpc"' in metrics


# --- fuzzing: property-based, over HTTP and gRPC -----------------------------------------------

FUZZ_EXAMPLES = 1000
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _json_values():
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=12)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=12,
    )


def _valid_doc() -> dict:
    return {
        "id": "r",
        "inputs": [
            {
                "name": "input",
                "shape": [1, 3, 2, 2],
                "datatype": "FP32",
                "data": [0.5] * 12,
                "parameters": {},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": False},
    }


FIELDS = (
    ("id",),
    ("inputs",),
    ("inputs", 0),
    ("inputs", 0, "name"),
    ("inputs", 0, "shape"),
    ("inputs", 0, "shape", 0),
    ("inputs", 0, "datatype"),
    ("inputs", 0, "data"),
    ("inputs", 0, "data", 0),
    ("inputs", 0, "parameters"),
    ("inputs", 0, "parameters", "binary_data_size"),
    ("outputs",),
    ("outputs", 0),
    ("outputs", 0, "name"),
    ("outputs", 0, "parameters"),
    ("outputs", 0, "parameters", "binary_data"),
    ("parameters",),
    ("parameters", "binary_data_output"),
)


def _http_cases():
    """(body, headers) of malformed Open Inference Protocol requests: a valid one with a field
    replaced or removed, cut short, with a binary part that does not fit its header, or noise;
    header sets with wrong binary header lengths and content types."""
    from hypothesis import strategies as st

    @st.composite
    def case(draw):
        doc = _valid_doc()
        kind = draw(st.sampled_from(["replace", "remove", "truncate", "binary", "noise"]))
        path = draw(st.sampled_from(FIELDS))
        if kind in ("replace", "remove"):
            target = doc
            for key in path[:-1]:
                target = target[key]
            if kind == "remove" and isinstance(target, dict):
                target.pop(path[-1], None)
            elif kind == "remove":
                del target[path[-1]]
            else:
                target[path[-1]] = draw(_json_values())
        body = json.dumps(doc).encode()
        headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", "x"]))}
        if draw(st.booleans()):  # printable ASCII and DEL, which the HTTP parser refuses
            headers["X-Fuzz"] = draw(st.text(st.characters(min_codepoint=33, max_codepoint=127)))
        if kind == "truncate":
            body = body[: draw(st.integers(0, len(body) - 1))]
        elif kind == "binary":
            doc["inputs"][0].pop("data")
            doc["inputs"][0]["parameters"] = {"binary_data_size": draw(st.integers(-5, 100))}
            header = json.dumps(doc).encode()
            body = header + draw(st.binary(max_size=60))
            word = st.text("0123456789abc-+ ", max_size=6).map(str.strip)
            length = draw(st.integers(-3, len(body) + 3).map(str) | word)
            headers["Inference-Header-Content-Length"] = length
        elif kind == "noise":
            body = draw(st.binary(max_size=200))
            if draw(st.booleans()):
                headers["Inference-Header-Content-Length"] = str(draw(st.integers(0, 300)))
        return body, headers

    return case()


def _settings():
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,  # the same cases on every run: a failure reproduces
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.mark.slow
def test_fuzzed_http_requests_never_get_a_5xx(patient_server):
    from hypothesis import given

    http = httpx.Client(
        base_url=f"http://127.0.0.1:{patient_server.port}",
        timeout=10,
        transport=httpx.HTTPTransport(socket_options=NODELAY),  # no 40 ms Nagle stalls
    )
    statuses = []

    @_settings()
    @given(_http_cases())
    def check(case):
        body, headers = case
        response = http.post("/v2/models/gala/infer", content=body, headers=headers)
        statuses.append(response.status_code)
        assert response.status_code < 500, (body[:300], headers, response.text[:300])
        if response.status_code >= 400:
            assert "error" in response.json()

    try:
        check()
    finally:
        http.close()
    assert len(statuses) >= FUZZ_EXAMPLES
    assert sum(400 <= s < 500 for s in statuses) > 0.9 * len(statuses)
    assert _binary_infer(patient_server) < 5  # a good request still succeeds
    assert b"Traceback" not in patient_server.log.read_bytes()


def _grpc_cases():
    from hypothesis import strategies as st
    from tritonclient.grpc import service_pb2 as pb

    names = st.sampled_from(["input", "image", "", "x" * 300]) | st.text(max_size=8)
    datatypes = st.sampled_from(["FP32", "BYTES", "INT8", "FP16", "BOOL", "?", ""])
    shapes = st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5), max_size=5)

    @st.composite
    def tensor(draw):
        t = pb.ModelInferRequest.InferInputTensor(
            name=draw(names), datatype=draw(datatypes), shape=draw(shapes)
        )
        field = draw(st.sampled_from(["fp32", "bytes", "int", "bool", "none"]))
        count = draw(st.integers(0, 13))
        if field == "fp32":
            t.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=count)))
        elif field == "bytes":
            t.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=20), max_size=3)))
        elif field == "int":
            t.contents.int_contents.extend(draw(st.lists(st.integers(-128, 127), max_size=count)))
        elif field == "bool":
            t.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=count)))
        return t

    @st.composite
    def request(draw):
        r = pb.ModelInferRequest(
            model_name=draw(st.sampled_from(["gala", "gala", "other", ""])),
            id=draw(st.text(max_size=5)),
            inputs=draw(st.lists(tensor(), max_size=3)),
        )
        if draw(st.booleans()):
            r.raw_input_contents.extend(draw(st.lists(st.binary(max_size=64), max_size=3)))
        for name in draw(st.lists(st.sampled_from(["probabilities", "logits", "nope"]))):
            out = r.outputs.add(name=name)
            kind = draw(st.sampled_from(["none", "int64_param", "string_param", "bool_param"]))
            if kind == "int64_param":
                out.parameters["classification"].int64_param = draw(st.integers(-(2**63), 99))
            elif kind == "string_param":
                out.parameters["classification"].string_param = draw(st.text(max_size=4))
            elif kind == "bool_param":
                out.parameters["classification"].bool_param = draw(st.booleans())
        return r

    return request()


@pytest.mark.slow
def test_fuzzed_grpc_requests_never_get_internal(patient_server, server):
    import grpc
    from hypothesis import given
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    codes = []

    @_settings()
    @given(_grpc_cases())
    def check(request):
        try:
            stub.ModelInfer(request, timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.append(err.code())
            assert err.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (
                request,
                err.details(),
            )

    try:
        check()
    finally:
        channel.close()
    assert len(codes) >= FUZZ_EXAMPLES
    client_errors = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    assert sum(c in client_errors for c in codes) > 0.9 * len(codes)
    assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) > 0.3 * len(codes)
    assert server.classify(_jpeg())["top_k"]
    assert b"Traceback" not in server.log.read_bytes()
