"""apollo_fast.serving against vLLM's OpenAI-compatible server on loopback (CPU build, fp32, eager).

One server for the module, started by `apollo-fast steer serve` (steered, with the push routes on).
Streaming clients run a bounded number of requests while weights are pushed: every request
completes, and each span of tokens the server labels with a version is that version's (steered)
greedy continuation, checked against transformers. The server is stopped by the command on
SIGTERM, and by process-group id with hard timeouts if anything fails.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from serving_fixtures import (
    PROMPTS,
    hf_greedy,
    load_model,
    perturb,
    save_model_dir,
    server_env,
    skip_without_vllm,
)

vllm = skip_without_vllm()

from apollo_fast.serving import PushError, connect_vllm, free_port  # noqa: E402
from apollo_fast.serving.transport import stream_generate  # noqa: E402
from apollo_fast.steering import SteeringVector, steer  # noqa: E402


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("server"))


COEF, LAYERS = 0.6, [1]


@pytest.fixture(scope="module")
def vector(tmp_path_factory):
    gen = torch.Generator().manual_seed(1)
    sv = SteeringVector({1: torch.randn(64, generator=gen)}, 64, 2)
    path = tmp_path_factory.mktemp("vector") / "sv.safetensors"
    sv.save(path)
    return sv, path


@pytest.fixture(scope="module")
def server(model_dir, vector, tmp_path_factory):
    """`apollo-fast steer serve` in a child process: a steered server with the push routes on.

    Teardown checks the command's own shutdown: SIGTERM, exit code 0, its server's process group gone.
    """
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "apollo_fast.cli",
        "steer",
        "serve",
        "--model",
        str(model_dir),
        "--vector",
        str(vector[1]),
        "--coef",
        str(COEF),
        "--layers",
        ",".join(map(str, LAYERS)),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--vllm-args",
        f"--kv-cache-memory-bytes {32 << 20}",
        "--log",
        str(tmp_path_factory.mktemp("server") / "vllm.log"),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **server_env()},
        start_new_session=True,
    )
    server_pid = None
    try:
        deadline, lines = time.monotonic() + 300, []
        while time.monotonic() < deadline:  # readline returns at the latest when the command exits
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving "):
                server_pid = int(line.split("(pid ")[1].split(",")[0])
                break
        assert server_pid, "steer serve did not come up:\n" + "".join(lines[-30:])
        yield f"http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 30
        while not _gone(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(server_pid), "steer serve left its server running"
    finally:
        for pid in (proc.pid, server_pid):
            if pid is not None and not _gone(pid):
                os.killpg(pid, signal.SIGKILL)
        proc.wait(30)


def test_steer_serve_serves_the_steered_model(server, model_dir, vector):
    model, handle = load_model(model_dir), connect_vllm(server)
    steered_any = False
    for p in PROMPTS:
        with steer(model, vector[0], COEF, LAYERS):
            expect = hf_greedy(model, p, 10)
        assert handle.greedy(p, 10) == expect
        steered_any |= expect != hf_greedy(model, p, 10)
    assert steered_any


def test_streams_complete_through_pushes(server, model_dir, vector):
    """Steered streams through pushes: steering stays on, every span is its version's steered continuation."""
    handle = connect_vllm(server)
    handle.set_steering(vector[0], COEF, LAYERS)
    weights = {0: load_model(model_dir)}
    handle.push(weights[0], 0)
    n, results, started = 200, {}, threading.Semaphore(0)
    models = {}
    for version in (1, 2, 3):
        models[version] = load_model(model_dir)
        perturb(models[version], scale=0.08, seed=200 + version)

    def client(i, prompt):
        chunks = []
        for chunk in stream_generate(server, prompt, n, timeout=120):
            if not chunks:
                started.release()
            chunks.append(chunk)
        results[i] = chunks

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(PROMPTS * 2)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=60)
    for version in (1, 2, 3):
        rec = handle.push(models[version], version)
        weights[version] = models[version]
        assert handle.version() == version and rec.bytes > 0
        time.sleep(0.02)
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads)
    seen = set()
    for i, prompt in enumerate(PROMPTS * 2):
        chunks = results[i]
        tokens = [t for c in chunks for t in c.get("token_ids") or []]
        last = chunks[-1]
        assert len(tokens) == n and last["finish_reason"] == "length"
        spans = last["weight_versions"]
        assert spans[0]["start"] == 0 and spans[-1]["end"] == n
        for span in spans:
            v = int(span["version"])
            seen.add(v)
            with steer(weights[v], vector[0], COEF, LAYERS):
                expect = hf_greedy(weights[v], prompt + tokens[: span["start"]], span["end"] - span["start"])
            assert tokens[span["start"] : span["end"]] == expect, f"request {i}, span {span}"
    assert len(seen) >= 2, f"no push landed while the requests streamed (versions seen: {seen})"
    # the OpenAI routes serve the newest version
    body = {
        "model": str(model_dir),
        "prompt": PROMPTS[0],
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    req = urllib.request.Request(
        server + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        got = json.loads(resp.read())["choices"][0]["token_ids"]
    with steer(weights[3], vector[0], COEF, LAYERS):
        assert got == hf_greedy(weights[3], PROMPTS[0], 8)


def test_http_push_verify_and_refused_push(server, model_dir):
    handle = connect_vllm(server)
    handle.clear_steering()  # verify compares with the trainer's unsteered model
    model = load_model(model_dir)
    perturb(model, seed=21)
    assert handle.push(model, 21, verify=True).verified
    served = handle.greedy(PROMPTS[1], 10)
    assert served == hf_greedy(model, PROMPTS[1], 10)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(PushError, match=r"keeps its previous version.*model\.norm\.weight: has inf/NaN"):
        handle.push(model, 22)
    assert handle.version() == 21 and handle.greedy(PROMPTS[1], 10) == served
