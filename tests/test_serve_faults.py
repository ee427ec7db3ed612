"""Faults provoked for real against gala-serve and gala-batch processes on 127.0.0.1: a batch
that fails inside the batcher, a wedged and a dead batcher worker, a flood past the queue, a
request head that stalls, a uvicorn without the private names the server relies on, corrupt,
truncated and non-image inputs, and a gala-batch job killed with SIGKILL and resumed.

The batcher's faults cannot be reached by any request (every input is checked for shape and
type before it is queued), so the server runs under a launcher that plants them: numpy's
``concatenate`` as the batcher sees it fails on a sample whose first value is ``FAIL``, as it
would on samples of different shapes, and the model call sleeps on ``SLOW`` and ends its
thread on ``DIE``. Everything else about the process, its sockets and its clients is real.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
from gala_serve import uvicorn_protocol
from gala_serve.batch import main as batch_main
from gala_serve.client import Client
from gala_serve.sources import split_key
from gala_serve_bench.flood import flood
from train_helpers import ENV
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from uvicorn.protocols.http import httptools_impl

from gala_scale.shards import tario

ROOT = Path(__file__).resolve().parents[1]
FAIL, SLOW, DIE = 1111.0, 2222.0, 3333.0
SHAPE = (3, 32, 32)
LAUNCH_FAULTY = f"""
import sys, time
import numpy as np
from gala_serve import app, batcher, model


class Numpy:
    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def concatenate(arrays, *args, **kwargs):
        if any(a.size and a.flat[0] == {FAIL} for a in arrays):
            raise ValueError("all the input array dimensions except for the concatenation axis "
                             "must match exactly (planted)")
        return np.concatenate(arrays, *args, **kwargs)


batcher.np = Numpy()
outputs = model.Model.outputs


def planted(self, batch):
    first = batch[:, 0, 0, 0]
    if (first == {SLOW}).any():
        time.sleep(3.0)
    if (first == {DIE}).any():
        raise SystemExit("planted: the worker thread ends")
    return outputs(self, batch)


model.Model.outputs = planted
sys.exit(app.main(sys.argv[1:]))
"""


@contextlib.contextmanager
def launched(artifact: Path, log: Path, *flags: str, launcher: str = LAUNCH_FAULTY):
    """A gala-serve process (HTTP and gRPC on free ports) under ``launcher``; yields a client
    once it is ready, with ``grpc_port``, ``log``, ``url`` and ``proc``. Another pytest session
    on this machine may take a port between its choice and the bind: then new ports."""
    for _ in range(3):
        proc, client = _start(artifact, log, launcher, flags)
        if client is not None:
            break
        if "Address already in use" not in log.read_text():
            raise AssertionError(log.read_text())
    else:
        raise AssertionError(log.read_text())
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait(10)


def _start(artifact: Path, log: Path, launcher: str, flags) -> tuple:
    from conftest import free_port

    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-c", launcher, "--artifact", str(artifact), "--port", str(port)]
    cmd += ["--grpc-port", str(grpc_port), "--providers", "cpu", *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    client = Client(f"http://127.0.0.1:{port}", retries=0, timeout=10)
    try:
        client.wait_ready(120, alive=lambda: proc.poll() is None)
    except (TimeoutError, RuntimeError):
        proc.kill()
        proc.wait(10)
        return proc, None
    client.grpc_port, client.log, client.url = grpc_port, log, f"http://127.0.0.1:{port}"
    client.proc = proc
    return proc, client


@pytest.fixture(scope="module")
def faulty(artifact, tmp_path_factory):
    """A server with a queue of 16 samples, batches of up to 16, a 1 s batch timeout and a 2 s
    request deadline."""
    flags = ["--max-batch", "16", "--max-queue", "16", "--max-request-batch", "16"]
    flags += ["--batch-timeout", "1", "--request-timeout", "2", "--max-delay-ms", "2"]
    log = tmp_path_factory.mktemp("faulty") / "server.log"
    with launched(artifact, log, *flags) as client:
        yield client


def _body(rows: int = 1, first: float = 0.0) -> tuple[bytes, dict]:
    """A binary-extension infer request of ``rows`` samples, the first value of each ``first``."""
    x = np.zeros((rows, *SHAPE), np.float32)
    x[:, 0, 0, 0] = first
    spec = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    header = json.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": x.nbytes}}]})
    return header.encode() + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _infer(server, rows: int = 1, first: float = 0.0, timeout: float = 10.0) -> httpx.Response:
    body, headers = _body(rows, first)
    return httpx.post(
        f"{server.url}/v2/models/gala/infer", content=body, headers=headers, timeout=timeout
    )


def _metric(server, line_start: str) -> float:
    text = server.request("GET", "/metrics")[2].decode()
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line_start))


# --- item 7: the batcher's worker ---------------------------------------------------------


@pytest.mark.slow
def test_a_batch_that_fails_in_the_batcher_fails_alone_and_the_worker_goes_on(faulty):
    answer = _infer(faulty, first=FAIL)
    assert answer.status_code == 500, answer.text
    error = answer.json()["error"]
    assert "while concatenating" in error and "ValueError" in error and "request id" in error
    # Then a burst (within the queue's 16 samples) that mixes good and failing requests: each
    # is answered, the failing ones with a 500 naming the stage, the others with a 200 unless
    # they shared a batch with a failing one.
    results: dict[int, httpx.Response] = {}

    def send(i: int) -> None:
        results[i] = _infer(faulty, first=FAIL if i % 3 == 0 else 0.0)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(results) == 12, "requests hung"
    for i, response in results.items():
        assert response.status_code in ((500,) if i % 3 == 0 else (200, 500)), response.text
        if response.status_code == 500:
            assert "while concatenating" in response.json()["error"], response.text
    assert all(_infer(faulty).status_code == 200 for _ in range(5))
    assert _infer(faulty).status_code == 200
    assert faulty.json("GET", "/v2/health/ready") == {"ready": True}
    assert _metric(faulty, 'gala_batch_failures_total{stage="concatenating"}') >= 2


@pytest.mark.slow
def test_a_wedged_model_call_turns_readiness_off_until_it_returns(faulty):
    slow: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: slow.append(_infer(faulty, first=SLOW)))
    sender.start()
    seen = None
    while sender.is_alive() and seen is None:  # the call sleeps 3 s; --batch-timeout is 1 s
        status, _, data = faulty.request("GET", "/v2/health/ready")
        if status == 503:
            seen = json.loads(data)
        time.sleep(0.05)
    assert seen is not None and seen["ready"] is False and "wedged" in seen["reason"], seen
    status, _, data = faulty.request("GET", "/v2/models/gala/ready")
    assert status == 503 and "wedged" in json.loads(data)["reason"]
    with grpc.insecure_channel(f"127.0.0.1:{faulty.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is False
    sender.join(10)
    assert slow and slow[0].status_code == 200  # slow, not failed
    assert faulty.json("GET", "/v2/health/ready") == {"ready": True}


@pytest.mark.slow
def test_a_flood_gets_only_200_and_503_and_the_server_answers_at_once_after(faulty):
    result = flood(faulty.url, SHAPE, concurrency=32, requests=240, rows=16, timeout=10)
    assert set(result["answers"]) <= {"200", "503"}, result
    assert result["answers"].get("200", 0) > 0 and result["answers"].get("503", 0) > 0, result
    assert result["retry_after"] == ["1"], result
    assert result["after_status"] == 200 and result["after_s"] < 1.0, result
    assert result["seconds"] < 20, result
    # gRPC: the same overload is UNAVAILABLE, with gRPC's own retry pushback.
    codes, pushback = asyncio.run(_grpc_burst(faulty.grpc_port, 48))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert grpc.StatusCode.UNAVAILABLE in codes and pushback == {"1000"}, (codes, pushback)
    assert _infer(faulty).status_code == 200
    assert (
        _metric(faulty, 'gala_request_errors_total{code="503",endpoint="infer",protocol="http"}')
        > 0
    )


async def _grpc_burst(port: int, count: int) -> tuple[list, set]:
    x = np.zeros((16, *SHAPE), np.float32)
    request = pb.ModelInferRequest(model_name="gala")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def one():
            call = stub.ModelInfer(request, timeout=10)
            try:
                await call
            except grpc.aio.AioRpcError as err:
                trailers = dict(err.trailing_metadata() or ())
                return err.code(), trailers.get("grpc-retry-pushback-ms")
            return grpc.StatusCode.OK, None

        answers = await asyncio.gather(*(one() for _ in range(count)))
    return [code for code, _ in answers], {p for _, p in answers if p is not None}


@pytest.mark.slow
def test_a_dead_worker_turns_readiness_off_and_requests_fail_at_once(artifact, tmp_path):
    with launched(artifact, tmp_path / "server.log", "--max-batch", "4") as server:
        answer = _infer(server, first=DIE)
        assert answer.status_code == 500 and "worker thread died" in answer.json()["error"]
        status, _, data = server.request("GET", "/v2/health/ready")
        assert status == 503 and "SystemExit" in json.loads(data)["reason"], data
        start = time.perf_counter()
        answer = _infer(server)
        assert answer.status_code == 503 and "died" in answer.json()["error"], answer.text
        assert time.perf_counter() - start < 1.0
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is False


@pytest.mark.slow
def test_an_artifact_whose_crop_does_not_fit_its_graph_is_refused(artifact, tmp_path):
    """The one real input that reached the batcher's concatenation: an artifact whose images
    decode to another size than its graph takes (an image request batched with a tensor
    request failed the batch; alone, every image request failed). Refused at start-up."""
    import shutil

    edited = tmp_path / "export"
    shutil.copytree(artifact, edited)
    doc = json.loads((edited / "artifact.json").read_text())
    doc["preprocess"]["crop"] = 28
    (edited / "artifact.json").write_text(json.dumps(doc))
    cmd = [sys.executable, "-m", "gala_serve.app", "--artifact", str(edited), "--providers", "cpu"]
    proc = subprocess.run(
        [*cmd, "--port", "0"], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "crops images to 28 x 28, the graph takes [3, 32, 32]" in proc.stderr


# --- item 8: uvicorn's private names -------------------------------------------------------


def test_the_uvicorn_names_the_server_relies_on_are_in_place_and_pinned():
    import uvicorn

    assert uvicorn_protocol.uvicorn_mismatches() == []
    pins = re.findall(r'"uvicorn([=<>!~]=?[^"]*)"', (ROOT / "serve" / "pyproject.toml").read_text())
    assert pins == [f"=={uvicorn_protocol.UVICORN_VERSION}"], pins  # exactly, and only once
    assert uvicorn.__version__ == uvicorn_protocol.UVICORN_VERSION


def _renamed_init(self, config, server_state, app_state, _loop=None):
    self._pipeline = self._cycle = None


@pytest.mark.parametrize(
    "target, name, value, reported",
    [
        ("HttpToolsProtocol", "_unset_keepalive_if_required", None, "_unset_keepalive"),
        ("HttpToolsProtocol", "on_response_complete", None, "on_response_complete"),
        ("HttpToolsProtocol", "__init__", _renamed_init, "HttpToolsProtocol.pipeline"),
        ("RequestResponseCycle", "__init__", _renamed_init, "response_complete"),
        ("HttpToolsProtocol", "on_headers_complete", lambda self: None, "on_response_complete"),
    ],
)
def test_a_uvicorn_that_moved_a_private_name_is_refused(monkeypatch, target, name, value, reported):
    cls = getattr(httptools_impl, target)
    if value is None:
        monkeypatch.delattr(cls, name)
    else:
        monkeypatch.setattr(cls, name, value)
    assert any(reported in m for m in uvicorn_protocol.uvicorn_mismatches()), (
        uvicorn_protocol.uvicorn_mismatches()
    )
    with pytest.raises(uvicorn_protocol.UvicornMismatch, match=reported):
        uvicorn_protocol.check_uvicorn()


@pytest.mark.slow
def test_a_server_on_such_a_uvicorn_exits_2_naming_what_moved(artifact, tmp_path):
    launcher = (
        "import sys\n"
        "from uvicorn.protocols.http import httptools_impl as h\n"
        "del h.HttpToolsProtocol._unset_keepalive_if_required\n"
        "from gala_serve import app\n"
        "sys.exit(app.main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", launcher, "--artifact", str(artifact)]
    cmd += ["--port", "0", "--providers", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "_unset_keepalive_if_required" in proc.stderr and "uvicorn==0.54.0" in proc.stderr


@pytest.mark.slow
def test_the_subclass_hooks_still_cut_a_stalled_head_and_a_silent_connection(faulty):
    """The deadline lives in hooks uvicorn calls (on_message_begin, connection_made): a head
    that stops half way gets a 408, and a connection that never sends is closed, both after
    --request-timeout (2 s)."""
    start = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", faulty.port), timeout=10) as stalled,
        socket.create_connection(("127.0.0.1", faulty.port), timeout=10) as silent,
    ):
        stalled.sendall(b"POST /v2/models/gala/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
        answer = stalled.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert silent.recv(100) == b""
    assert 1.5 < time.monotonic() - start < 8


# --- item 9: gala-batch --------------------------------------------------------------------


def test_the_batch_key_rule_is_the_shard_tools_rule():
    names = [
        "abc.jpg",
        "abc.seg.jpg",
        "dir/abc.jpg",
        "v1.2/abc.cls",
        "a.b/c.d/e.f.g",
        "dir.v2/sub/abc",
        "noext",
        ".hidden",
        "dir/.hidden.jpg",
        "a..b",
        "x.y/",
    ]
    for name in names:
        assert split_key(name) == tario.split_key(name), name
    assert split_key("v1.2/abc.jpg") == ("v1.2/abc", "jpg")


def _jpegs(shards: Path, count: int) -> list[tuple[bytes, int]]:
    manifest = json.loads((shards / "manifest.json").read_text())
    tar = shards / manifest["splits"]["test"]["shards"][0]["file"]
    return [(f["jpg"], int(f["cls"])) for _, f in list(tario.iter_tar(tar))[:count]]


def _png(good: bytes) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(good)).save(out, format="PNG")
    return out.getvalue()


def _folder_input(root: Path, images: list[tuple[bytes, int]]) -> dict[str, str]:
    """<class>/<image> files, good ones and bad ones; {id: why bad} of the bad ones."""
    for i, (data, label) in enumerate(images):
        (root / f"class_{label:03d}").mkdir(parents=True, exist_ok=True)
        (root / f"class_{label:03d}" / f"img_{i:03d}.jpg").write_bytes(data)
    png = _png(images[0][0])
    bad = {
        "class_000/corrupt.jpg": b"\xff\xd8\xff\xe0" + os.urandom(600),
        "class_001/truncated.png": png[: len(png) // 2],
        "class_002/notes.jpg": b"these are notes, not an image\n",
        "class_003/empty.png": b"",
    }
    for name, data in bad.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return {name: "server" for name in bad}


def _shard_input(root: Path, images: list[tuple[bytes, int]]) -> dict[str, str]:
    """Two shards whose keys sit under dotted folder names, with bad members; {id: why bad}."""
    samples = [
        (f"v1.{i % 2}/img_{i:03d}", {"jpg": d, "cls": b"%d" % c}) for i, (d, c) in enumerate(images)
    ]
    good = images[0][0]
    bad = [
        ("bad.v2/corrupt", {"jpg": os.urandom(700), "cls": b"0"}, "server"),
        ("bad.v2/truncated", {"jpg": good[: len(good) // 3], "cls": b"1"}, "server"),
        ("bad.v2/text", {"jpg": b"not an image at all", "cls": b"2"}, "server"),
        ("bad.v2/no_image", {"txt": b"a caption without its image", "cls": b"3"}, "local"),
    ]
    half = len(samples) // 2
    shards = [samples[:half] + [b[:2] for b in bad[:2]], samples[half:] + [b[:2] for b in bad[2:]]]
    entries = []
    (root / "test").mkdir(parents=True)
    for n, shard in enumerate(shards):
        tar = root / "test" / f"test-{n:06d}.tar"
        tario.write_tar(tar, shard)
        entries.append({"file": f"test/{tar.name}", "num_samples": len(shard)})
    manifest = {"image_ext": "jpg", "splits": {"test": {"shards": entries}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return {key: why for key, _, why in bad}


LAUNCH_KILLED = """
import os, signal, sys, threading
from gala_serve import batch

once, calls, lock = batch.Inferrer._once, [0], threading.Lock()


def killing(self, image):
    with lock:
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT_CALL"]):
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind
    return once(self, image)


batch.Inferrer._once = killing
sys.exit(batch.main(sys.argv[1:]))
"""


def _records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _sent(server, protocol: str) -> float:
    """Infer requests the server has answered over ``protocol``, once the count settles."""
    line = f'gala_requests_total{{endpoint="infer",protocol="{protocol}"}}'
    last = -1.0
    while (now := _metric(server, line)) != last:
        last = now
        time.sleep(0.3)
    return now


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_batch_reports_bad_items_and_resumes_after_a_kill(
    faulty, synthetic_shards, tmp_path, capsys, source
):
    """A job over good images and corrupt, truncated, empty and non-image ones records every
    bad one with its key and the server's message and predicts every good one once; killed
    with SIGKILL part way, ``--resume`` sends only what was not written and ends with the same
    records as the job that ran through. Shards: keys under dotted folder names, over gRPC."""
    images = _jpegs(synthetic_shards, 36)
    data = tmp_path / "input"
    bad = (_folder_input if source == "folder" else _shard_input)(data, images)
    protocol = ["--grpc", f"127.0.0.1:{faulty.grpc_port}"] if source == "shards" else []
    common = ["--server", faulty.url, "--input", str(data), "--transductive", *protocol]
    common += ["--concurrency", "4", "--retries", "0"]

    whole = tmp_path / "whole" / "preds.jsonl"
    whole.parent.mkdir()
    assert batch_main([*common, "--out", str(whole)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = _records(whole)
    assert summary["images"] == len(records) == 40 and summary["errors"] == len(bad) == 4
    predicted = [r["id"] for r in records if "pred" in r]
    assert len(predicted) == len(set(predicted)) == 36
    for r in records:
        if r["id"] in bad:
            assert "pred" not in r and r["error"], r
            if bad[r["id"]] == "server":
                assert r["status"] in ("400", "StatusCode.INVALID_ARGUMENT"), r
                assert "image" in r["error"], r
            else:
                assert r["error"].startswith("cannot read the image") and r["status"] is None
    assert sorted(p.name for p in whole.parent.iterdir()) == ["preds.jsonl"]

    out = tmp_path / "resumed" / "preds.jsonl"
    out.parent.mkdir()
    cmd = [sys.executable, "-c", LAUNCH_KILLED, *common, "--out", str(out)]
    killed = subprocess.run(cmd, env={**ENV, "KILL_AT_CALL": "26"}, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    partial = out.with_name(".preds.jsonl.partial")
    done = len([line for line in partial.read_bytes().split(b"\n")[:-1]])
    assert 0 < done < 40 and not out.exists()

    protocol_name = "grpc" if source == "shards" else "http"
    before = _sent(faulty, protocol_name)
    assert batch_main([*common, "--out", str(out), "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["resumed"] == done and summary["errors"] == 4
    unread = {k for k, why in bad.items() if why == "local"}
    to_send = [r for r in records[done:] if r["id"] not in unread]
    assert _sent(faulty, protocol_name) - before == len(to_send)  # none of the done ones again
    assert sorted(p.name for p in out.parent.iterdir()) == ["preds.jsonl"]
    again = _records(out)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    for mine, theirs in zip(again, records, strict=True):
        assert mine.get("pred") == theirs.get("pred") and mine.get("error") == theirs.get("error")


@pytest.mark.slow
def test_a_job_whose_server_dies_keeps_only_its_records(
    faulty, artifact, synthetic_shards, tmp_path
):
    """The server is killed while a job runs: the job stops (exit 2) saying how to go on, and
    leaves its records and raw rows and nothing else; --resume against another server ends it.
    A job that wrote nothing leaves nothing."""
    data = tmp_path / "input"
    images = _jpegs(synthetic_shards, 36)
    _folder_input(data, images * 6)  # 216 good images: a job that lasts a moment
    out = tmp_path / "out" / "preds.jsonl"
    out.parent.mkdir()
    partial = out.with_name(".preds.jsonl.partial")
    common = ["--input", str(data), "--out", str(out), "--transductive", "--retries", "0"]
    common += ["--concurrency", "1"]
    with launched(artifact, tmp_path / "doomed.log") as doomed:
        cmd = [sys.executable, "-m", "gala_serve.batch", "--server", doomed.url, *common]
        job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (partial.is_file() and partial.read_bytes().count(b"\n") >= 10):
            assert time.monotonic() < deadline and job.poll() is None, job.communicate()
            time.sleep(0.005)
        doomed.proc.kill()
        _, stderr = job.communicate(timeout=60)
    assert job.returncode == 2, stderr.decode()
    assert b"--resume" in stderr and str(partial).encode() in stderr
    left = sorted(p.name for p in out.parent.iterdir())
    assert left == [".preds.jsonl.partial", ".preds.jsonl.partial.raw"], left
    done = partial.read_bytes().count(b"\n")
    assert batch_main(["--server", faulty.url, *common, "--resume"]) == 0
    records = _records(out)
    assert len(records) == 220 and len({r["id"] for r in records}) == 220
    assert sum("pred" in r for r in records) == 216 and done < 220
    assert sorted(p.name for p in out.parent.iterdir()) == ["preds.jsonl"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert batch_main(["--server", faulty.url, "--input", str(empty), "--out", str(out)]) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["preds.jsonl"]
