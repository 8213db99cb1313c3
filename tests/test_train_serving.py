"""`apollo-fast train --serve-vllm local`: the model is served by vLLM's OpenAI server while it trains.

One real server (vLLM's CPU build, fp32, eager) on a free loopback port, started and stopped by the command:
the first push makes it serve the trainer's weights at step 0, pushes follow every N steps off the training
thread, the last one at the final step; run.json lists them; after the run the server's process group is
gone. (That each push serves exactly the pushed weights is tests/test_serving_*.py's subject.)
"""

from __future__ import annotations

import json
import os
import socket

from serving_fixtures import save_model_dir, server_env, skip_without_vllm
from train_fixtures import copy_behaviour, write_jsonl

vllm = skip_without_vllm()

from apollo_fast import cli  # noqa: E402
from apollo_fast.serving import free_port  # noqa: E402


def test_train_serves_the_model_as_it_trains(tmp_path, monkeypatch, capsys):
    model_dir = save_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(6, seed=7, segments=1))
    out, port = tmp_path / "run", free_port()
    for key, value in server_env().items():
        monkeypatch.setenv(key, value)
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "5",
            "--lr", "1e-2", "--rank", "4", "--no-progress", "--serve-vllm", "local", "--serve-port", str(port),
            "--push-every", "2", "--serve-vllm-args",
            "--max-model-len 256 --kv-cache-memory-bytes 33554432"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}/v1" in err, err
    run = json.loads((out / "run.json").read_text())
    versions = [p["version"] for p in run["pushes"]]
    assert versions[0] == 0 and versions[-1] == 5 and versions == sorted(versions), versions
    assert set(versions) <= {0, 2, 3, 4, 5} and not run["push_failures"]
    assert all(p["bytes"] > 0 and p["seconds"] > 0 for p in run["pushes"])
    with socket.socket() as probe:  # the command stopped its server: nothing listens there any more
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (its closed connections may linger)
        probe.bind(("127.0.0.1", port))


def test_serve_vllm_bad_values_exit_2(tmp_path, capsys):
    model_dir = save_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "b.jsonl", copy_behaviour(2, seed=7, segments=1))
    base = ["train", "--model", str(model_dir), "--data", str(data), "--steps", "1", "--no-progress"]
    assert cli.main([*base, "--out", str(tmp_path / "a"), "--serve-vllm", "nowhere"]) == 2
    assert "serve_vllm must be 'local' or a server URL" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "b"), "--serve-vllm", "local", "--push-every", "0"]) == 2
    assert "push_every must be an integer >= 1" in capsys.readouterr().err
    assert os.path.exists(tmp_path) and not (tmp_path / "a").exists()
