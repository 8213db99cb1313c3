"""Starting engines: `start_vllm` (an in-process `vllm.LLM`) and `serve_vllm` (an OpenAI-compatible server).

Both load our worker extension, so `connect_vllm` can push weights and steer. The server runs in a
child process group of its own (the API server and its engine-core process) and is stopped by
process-group id, with a hard timeout, when closed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .worker import WORKER_EXTENSION

__all__ = ["start_vllm", "serve_vllm", "serve_steered", "VLLMServer", "DEFAULT_PORT", "free_port"]

DEFAULT_PORT = 8000  # vLLM's own default


def _check_model_dir(model_dir) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model folder (config.json) at {path}")
    return path


def start_vllm(model_dir, **llm_kwargs: Any):
    """An in-process `vllm.LLM` on `model_dir` with our worker extension, ready for connect_vllm.

    Sets VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine runs in this process, so pushes can pass
    tensors without a copy and happen between its steps). Defaults: enforce_eager=True (steering
    hooks need it). Any other vllm.LLM argument passes through (dtype, max_model_len,
    kv_cache_memory_bytes, ...).
    """
    path = _check_model_dir(model_dir)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise ValueError(
            "start_vllm runs the engine in this process: unset VLLM_ENABLE_V1_MULTIPROCESSING "
            "or set it to 0 (use serve_vllm for a separate server)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    ext = llm_kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
    if ext != WORKER_EXTENSION:
        raise ValueError(f"worker_extension_cls must be {WORKER_EXTENSION!r}, got {ext!r}")
    llm_kwargs.setdefault("enforce_eager", True)
    import vllm

    return vllm.LLM(str(path), **llm_kwargs)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class VLLMServer:
    """A running `vllm.entrypoints.openai.api_server` child process; `url`, `pid`, `log`, `close()`."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self, timeout: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout` seconds."""
        if self.process.poll() is None:  # the API server shuts its engine core down itself
            try:
                os.kill(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever is left of the group (the engine core), also after a clean exit of the leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.wait(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # until the killed members are gone too
            try:
                os.killpg(self.process.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_vllm(
    model_dir,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    log: str | os.PathLike | None = None,
    ready_timeout: float = 300.0,
) -> VLLMServer:
    """Start vLLM's OpenAI-compatible server on `model_dir` at http://HOST:PORT and wait until it answers.

    It runs with our worker extension, `--enforce-eager`, `--enable-scale-out` (its token-in/token-out
    /inference/v1/generate route labels each token with the weight version that produced it) and
    VLLM_SERVER_DEV_MODE=1 (the routes pushes use: /collective_rpc, /pause, /resume,
    /update_weight_version, /reset_prefix_cache; development routes, so keep the server on a
    trusted host or network). `args` are more
    `vllm serve` options (`["--dtype", "float32", "--max-model-len", "512"]`). Output goes to
    `log` (a temporary file by default). Raises RuntimeError with the log's tail if the server exits
    or is not ready in `ready_timeout` seconds.
    """
    path = _check_model_dir(model_dir)
    with socket.socket() as probe:  # else a server already there would answer our readiness check
        try:
            probe.bind((host, int(port)))
        except OSError as err:
            raise ValueError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(path),
        "--host",
        host,
        "--port",
        str(int(port)),
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--enforce-eager",
        "--enable-scale-out",
        *(args or []),
    ]
    log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
    child_env = {**os.environ, **(env or {}), "VLLM_SERVER_DEV_MODE": "1"}
    if not _has_cuda():  # CPU: the worker runs inside the engine-core process (one process fewer to start)
        child_env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env, start_new_session=True
        )
    server = VLLMServer(proc, f"http://{host}:{int(port)}", log_path)
    deadline = time.monotonic() + ready_timeout
    while True:
        if proc.poll() is not None:
            server.close()
            raise RuntimeError(
                f"the vLLM server exited with code {proc.returncode} before it was ready "
                f"(log {log_path}):\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + "/v1/models", timeout=5) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.close()
            raise RuntimeError(
                f"the vLLM server was not ready after {ready_timeout:.0f} s (log {log_path}):\n{server.log_tail()}"
            )
        time.sleep(0.5)


def serve_steered(
    model_dir,
    vector,
    coefficient: float,
    layers=None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    **serve_options: Any,
):
    """serve_vllm, then steer it: (VLLMServer, VLLMHandle). The vector is checked against the model's
    config before the server starts (hidden size, layer count, layers the vector has)."""
    import json

    from ..steering import SteeringVector
    from .handle import connect_vllm

    path = _check_model_dir(model_dir)
    sv = vector if isinstance(vector, SteeringVector) else SteeringVector.load(vector)
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if (cfg.get("hidden_size"), cfg.get("num_hidden_layers")) != (sv.hidden_size, sv.num_layers):
        raise ValueError(
            f"steering vector is for hidden size {sv.hidden_size} and {sv.num_layers} layers; "
            f"{path} has {cfg.get('hidden_size')} and {cfg.get('num_hidden_layers')}"
        )
    missing = [i for i in (layers or []) if i not in sv.directions]
    if missing:
        raise ValueError(f"steering vector has no direction for layers {missing} (it has {sv.layers})")
    server = serve_vllm(path, host, port, **serve_options)
    try:
        handle = connect_vllm(server)
        handle.set_steering(sv, coefficient, layers)
    except BaseException:
        server.close()
        raise
    return server, handle
