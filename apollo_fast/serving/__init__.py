"""Train while vLLM serves: push weights into a live engine, versioned and verified, and steer it.

Public API:
    start_vllm(model_dir, **llm_kwargs)   an in-process vllm.LLM with our worker extension
    serve_vllm(model_dir, host, port)     vLLM's OpenAI-compatible server in a child process (VLLMServer)
    serve_steered(model_dir, vector, coefficient, layers)   the same, steered (`apollo-fast steer serve`)
    WORKER_EXTENSION                      dotted class path for `worker_extension_cls` / `--worker-extension-cls`
    connect_vllm(llm_or_url)              a VLLMHandle: push, version, set_steering, clear_steering, close
    BackgroundPusher(handle, every)       a training loop's pushes every N optimizer steps, off-thread
    PushError, VerifyError, EngineError   what a failed push, verification or engine call raises
    PushRecord                            version, bytes and seconds of one push
Nothing here imports vllm until an engine is started or connected.
"""

from .engine import DEFAULT_PORT, VLLMServer, free_port, serve_steered, serve_vllm, start_vllm
from .handle import PushError, PushRecord, VerifyError, VLLMHandle, connect_vllm
from .pusher import BackgroundPusher
from .transport import EngineError
from .worker import WORKER_EXTENSION, reload_refusal

__all__ = [
    "start_vllm",
    "serve_vllm",
    "serve_steered",
    "VLLMServer",
    "DEFAULT_PORT",
    "free_port",
    "WORKER_EXTENSION",
    "connect_vllm",
    "VLLMHandle",
    "BackgroundPusher",
    "PushError",
    "VerifyError",
    "EngineError",
    "PushRecord",
    "reload_refusal",
]
