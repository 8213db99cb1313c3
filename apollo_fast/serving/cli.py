"""`apollo-fast steer serve`: a steered model in vLLM's OpenAI-compatible server, until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time

from ..checks import layer_list
from .engine import DEFAULT_PORT

__all__ = ["add_serve_arguments", "steer_serve"]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--vector", required=True, help="steering vector (.safetensors from `steer extract`)")
    p.add_argument("--coef", type=float, required=True, help="coefficient of the direction")
    p.add_argument(
        "--layers", default=None, help="comma-separated decoder layer indices (default: all of the vector's)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--dtype", default="auto", help="vLLM's --dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--vllm-args", default="", help='more `vllm serve` options, one string: "--kv-cache-memory-bytes 1G"'
    )
    p.add_argument("--log", default=None, help="server log file (default: a temporary file)")


def steer_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine import serve_steered

    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model: no model folder (config.json) at {args.model}")
    if not Path(args.vector).is_file():
        raise FileNotFoundError(f"--vector: no such file {args.vector}")
    try:
        extra = shlex.split(args.vllm_args)
    except ValueError as err:
        raise ValueError(f"--vllm-args: {err}") from None
    vllm_args = [
        "--dtype",
        args.dtype,
        *(["--max-model-len", str(args.max_model_len)] if args.max_model_len else []),
        *extra,
    ]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    server, handle = serve_steered(
        args.model, args.vector, args.coef, layer_list(args.layers), args.host, args.port, args=vllm_args, log=args.log
    )
    try:
        print(
            f"serving {args.model} steered (coefficient {args.coef:g}, layers {args.layers or 'all'}) at "
            f"{server.url}/v1 (pid {server.pid}, log {server.log}); Ctrl-C stops it",
            flush=True,
        )
        while not stop and server.process.poll() is None:
            time.sleep(0.2)
        if server.process.poll() is not None:
            print(
                f"the vLLM server exited with code {server.process.returncode}:\n{server.log_tail()}", file=sys.stderr
            )
            return 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()
