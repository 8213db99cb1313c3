"""How the trainer reaches an engine: an in-process `vllm.LLM`, or a server's HTTP routes.

Both give the same operations: call a worker method (`rpc`), hold the engine between steps while
a push, its version label and the cache reset happen together (`exclusive`), read and set the
engine's weight version (vLLM labels every generated token with it), reset the prefix cache
(requests in flight are recomputed on the new weights), and greedy tokens for a probe prompt.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["EngineError", "InprocTransport", "HttpTransport"]

_DEV_MODE_HINT = (
    "start the server with VLLM_SERVER_DEV_MODE=1 and --worker-extension-cls "
    "apollo_fast.serving.worker.ApolloWorkerExtension (apollo_fast.serving.serve_vllm does both)"
)


class EngineError(RuntimeError):
    """The engine refused or failed an operation; the message says why."""


class InprocTransport:
    """A `vllm.LLM` in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0).

    Its engine steps only when some thread calls `generate`. A lock wrapped around the engine's
    `step` and `add_request` lets another thread (the trainer's pusher) run between two steps;
    `generate` itself is not thread-safe in vLLM, so `greedy` waits until the engine is idle.
    """

    wants_file = False

    def __init__(self, llm: Any) -> None:
        from vllm.v1.engine.core_client import InprocClient

        engine = llm.llm_engine
        if not isinstance(getattr(engine, "engine_core", None), InprocClient):
            raise EngineError(
                "connect_vllm needs an in-process engine: create the vllm.LLM with "
                "VLLM_ENABLE_V1_MULTIPROCESSING=0 (start_vllm does), or connect to a server URL"
            )
        self.llm = llm
        lock = getattr(engine, "_apollo_lock", None)
        if lock is None:
            lock = threading.RLock()
            for name in ("step", "add_request"):
                original = getattr(engine, name)

                def locked(*args, _original=original, **kwargs):
                    with lock:
                        return _original(*args, **kwargs)

                setattr(engine, name, locked)
            engine._apollo_lock = lock
        self.lock = lock
        import torch

        self.threads = torch.get_num_threads()

    def _same_threads(self) -> None:
        """vLLM-CPU fixes its attention metadata's OpenMP thread count at start-up and checks it in
        every step: threads that drive the engine (ours: the background pusher's) must match it.
        torch._C's setter: vLLM's CPU worker replaces torch.set_num_threads with a no-op."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch._C.set_num_threads(self.threads)

    def rpc(self, method: str, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        self._same_threads()
        with self.lock:
            return self.llm.collective_rpc(method, timeout=timeout, kwargs={"request": request})[0]

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self.lock:
            yield

    def set_version(self, label: str) -> None:
        self.llm.llm_engine.set_weight_version(label)

    def get_version(self) -> str:
        return self.llm.llm_engine.get_weight_version()

    def reset_caches(self) -> None:
        if not self.llm.llm_engine.reset_prefix_cache(reset_running_requests=True):
            raise EngineError("the engine could not reset its prefix cache")

    def greedy(self, prompt: list[int], max_tokens: int, timeout: float = 600) -> tuple[list[int], list[str]]:
        """Greedy tokens and the weight version that produced each ("?" where the engine does not say)."""
        from vllm import SamplingParams

        self._same_threads()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if not self.llm.llm_engine.has_unfinished_requests():
                    out = self.llm.generate([{"prompt_token_ids": list(prompt)}], params, use_tqdm=False)[0].outputs[0]
                    return list(out.token_ids), _labels(out.weight_versions, len(out.token_ids))
            if time.monotonic() > deadline:
                raise EngineError(f"the in-process engine stayed busy for {timeout:.0f} s; greedy needs it idle")
            time.sleep(0.01)

    def close(self) -> None:
        pass


def _labels(spans, n: int) -> list[str]:
    labels = ["?"] * n
    for span in spans or []:
        version, start, end = (
            (span.version, span.start, span.end)
            if hasattr(span, "version")
            else (span["version"], span["start"], span["end"])
        )
        labels[start:end] = [str(version)] * (end - start)
    return labels


class HttpTransport:
    """A vLLM OpenAI-compatible server with the development routes (`VLLM_SERVER_DEV_MODE=1`).

    A push pauses scheduling (`/pause?mode=keep`: requests stay queued, nothing is dropped), calls
    the worker, labels the version, resets the prefix cache and resumes: one step boundary.
    """

    wants_file = True

    def __init__(self, url: str, timeout: float = 600) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._scale_out = True  # /inference/v1/generate labels tokens with weight versions

    def _call(self, method: str, path: str, body: dict | None = None, query: dict | None = None) -> Any:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:2000]
            hint = f" ({_DEV_MODE_HINT})" if err.code == 404 else ""
            raise EngineError(f"{method} {url}: HTTP {err.code}: {detail}{hint}") from None
        except (urllib.error.URLError, OSError) as err:
            raise EngineError(f"{method} {url}: {err}") from None
        return json.loads(raw) if raw.strip() else None

    def rpc(self, method: str, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        body = {"method": method, "kwargs": {"request": json.dumps(request)}}
        if timeout is not None:
            body["timeout"] = timeout
        results = self._call("POST", "/collective_rpc", body)["results"]
        result = results[0]
        if not isinstance(result, dict):
            raise EngineError(f"{method}: unexpected worker reply {result!r} ({_DEV_MODE_HINT})")
        errors = [r["error"] for r in results if isinstance(r, dict) and "error" in r]
        return {"error": errors[0]} if errors else result

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        self._call("POST", "/pause", query={"mode": "keep"})
        try:
            yield
        finally:
            self._call("POST", "/resume")

    def set_version(self, label: str) -> None:
        self._call("POST", "/update_weight_version", {"new_version": label})

    def get_version(self) -> str:
        return self._call("GET", "/weight_info")["weight_version"]

    def reset_caches(self) -> None:
        if not self._call("POST", "/reset_prefix_cache", query={"reset_running_requests": "true"}).get("success"):
            raise EngineError("the server could not reset its prefix cache")

    def greedy(self, prompt: list[int], max_tokens: int, timeout: float = 600) -> tuple[list[int], list[str]]:
        body = {
            "token_ids": list(prompt),
            "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
        }
        if self._scale_out:
            try:
                choice = self._call("POST", "/inference/v1/generate", body)["choices"][0]
                tokens = list(choice["token_ids"])
                return tokens, _labels(choice.get("weight_versions"), len(tokens))
            except EngineError as err:
                if "HTTP 403" not in str(err) and "HTTP 404" not in str(err):
                    raise
                self._scale_out = False  # a server without --enable-scale-out: no version labels
        model = self._call("GET", "/v1/models")["data"][0]["id"]
        body = {
            "model": model,
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        tokens = list(self._call("POST", "/v1/completions", body)["choices"][0]["token_ids"])
        return tokens, ["?"] * len(tokens)

    def close(self) -> None:
        pass


def stream_generate(url: str, prompt: list[int], max_tokens: int, timeout: float = 120) -> Iterator[dict[str, Any]]:
    """Greedy tokens of a server's token-in/token-out route, streamed: one dict per chunk with
    `token_ids` (new tokens), and on the last chunk `finish_reason` and `weight_versions` (spans)."""
    body = {
        "token_ids": list(prompt),
        "stream": True,
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True},
    }
    req = urllib.request.Request(
        url.rstrip("/") + "/inference/v1/generate",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)["choices"][0]
