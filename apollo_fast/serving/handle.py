"""`connect_vllm`: a handle that pushes a training model's weights into a running vLLM engine.

A push is two halves, so a trainer can take the first between optimizer steps and leave the
second to a background thread: `snapshot` (in the trainer's thread: which tensors changed since
the last push, copied to the host in the engine's dtype, plus the trainer's greedy reference when
verifying) and `send` (the transfer, the in-place reload between two engine steps, the version
label, the cache reset, the optional verification). `push` does both.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .payload import digests, group_of, incomplete_groups, nbytes
from .transport import EngineError, HttpTransport, InprocTransport

__all__ = ["connect_vllm", "VLLMHandle", "PushError", "VerifyError", "PushRecord", "Snapshot"]


class PushError(EngineError):
    """The push did not happen; the engine keeps serving its previous version. The message says why."""


class VerifyError(EngineError):
    """The push happened, but the engine's greedy tokens on the probe differ from the trainer model's."""


@dataclass
class PushRecord:
    """One push: the version, what was sent, and how long it took (seconds, wall clock)."""

    version: int
    bytes: int
    tensors: int
    partial: bool
    snapshot_seconds: float
    seconds: float  # transfer + reload + label + cache reset, as the trainer waited for it
    engine_seconds: float  # the worker's reload alone
    verified: bool | None = None
    started: float = 0.0  # time.monotonic() when the send began

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Snapshot:
    """The trainer's weights at one version, ready to send (host tensors in the engine's dtype)."""

    version: int
    tensors: dict[str, torch.Tensor]
    digests: dict[str, int]
    partial: bool
    seconds: float
    reference: tuple[list[int], list[float]] | None = None  # greedy tokens, top-1 minus top-2 logit per token
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(nbytes(t) for t in self.tensors.values())


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names and layout its saved checkpoint has (what vLLM loads):
    transformers 5 keeps some tensors in another layout in memory (fused MoE experts) and converts
    them on save_pretrained; this applies the same conversion, without copying where it can."""
    state = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: memory layout == checkpoint layout
        return state
    return dict(revert_weight_conversion(model, state)) if hasattr(model, "config") else state


@torch.no_grad()
def greedy_reference(model: nn.Module, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """The model's greedy continuation of `prompt` and, per token, its top-1 minus top-2 logit."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        tokens, margins = [], []
        for i in range(max_tokens):
            top = out.logits[0, -1].float().topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            if i + 1 < max_tokens:
                out = model(
                    input_ids=torch.tensor([[tokens[-1]]], device=device),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        return tokens, margins
    finally:
        model.train(was_training)


class VLLMHandle:
    """Pushes, versions and steering for one engine. Use `connect_vllm` to make one.

    `probe` (token ids) and `verify_tokens` set the verification prompt; `verify_tolerance` is the
    largest top-1 minus top-2 logit gap of the trainer model at which the engine may pick another
    token (default 0: exact, for fp32 engines and models; give a tolerance for bf16, whose
    kernels round differently from the trainer's).
    """

    def __init__(
        self, transport, *, probe: list[int] | None = None, verify_tokens: int = 16, verify_tolerance: float = 0.0
    ) -> None:
        self._t = transport
        self._info: dict[str, Any] | None = None
        self._sent: dict[str, int] = {}  # digest of each tensor as the engine has it
        self._lock = threading.Lock()  # one push at a time per handle
        self._probe = probe
        self.verify_tokens = verify_tokens
        self.verify_tolerance = verify_tolerance
        self.records: list[PushRecord] = []

    # ---- engine facts
    def info(self, refresh: bool = False) -> dict[str, Any]:
        """The engine's model type, dtype, platform, checkpoint names and shapes (from the worker)."""
        if self._info is None or refresh:
            info = self._t.rpc("apollo_info", {})
            if "error" in info:
                raise EngineError(f"the engine's worker extension failed: {info['error']}")
            self._info = info
        return self._info

    @property
    def probe(self) -> list[int]:
        if self._probe is None:
            vocab = self._vocab()
            self._probe = [(7 * i + 3) % vocab for i in range(8)]
        return self._probe

    def _vocab(self) -> int:
        specs = self.info()["specs"]
        for name, (shape, _) in specs.items():
            if name.endswith("embed_tokens.weight"):
                return int(shape[0])
        return 2

    def _specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(s), getattr(torch, d)) for k, (s, d) in self.info()["specs"].items()}

    def version(self) -> int | None:
        """The version the engine serves now (as the engine reports it); None before the first push."""
        label = self._t.get_version()
        return int(label) if str(label).lstrip("-").isdigit() else None

    # ---- pushes
    def snapshot(self, model: nn.Module, version: int, verify: bool = False) -> Snapshot:
        """Copy what changed since the last push (whole fusion groups) to the host, in the engine's dtype."""
        t0 = time.perf_counter()
        info = self.info()
        if info["refusal"]:
            raise PushError(info["refusal"])
        specs = self._specs()
        dtype = getattr(torch, info["dtype"])
        state = checkpoint_state(model)
        sendable = {k: v for k, v in state.items() if k in specs}
        ptrs = {v.data_ptr() for v in sendable.values()}
        extra = [k for k, v in state.items() if k not in specs and v.is_floating_point() and v.data_ptr() not in ptrs]
        problems = []
        if extra:
            problems.append(f"the model has {len(extra)} tensors the engine's checkpoint lacks: {', '.join(extra[:5])}")
        problems += [
            f"{k}: shape {tuple(v.shape)}, the engine's is {specs[k][0]}"
            for k, v in sendable.items()
            if tuple(v.shape) != specs[k][0]
        ]
        missing = incomplete_groups(sendable, specs)
        if missing:
            problems.append(
                "the model lacks parts of fused groups: " + ", ".join(n for ns in missing.values() for n in ns)[:300]
            )
        if problems:
            raise PushError("cannot push this model into the engine: " + "; ".join(problems))
        now = digests(sendable)
        changed = {group_of(k) for k, d in now.items() if self._sent.get(k) != d}
        names = [k for k in sendable if group_of(k) in changed]
        device = getattr(self._t, "payload_device", "cpu")
        tensors = {k: sendable[k].detach().to(device=device, dtype=dtype, copy=True) for k in names}
        reference = greedy_reference(model, self.probe, self.verify_tokens) if verify else None
        return Snapshot(
            int(version),
            tensors,
            {k: now[k] for k in names},
            len(names) < len(sendable),
            time.perf_counter() - t0,
            reference,
        )

    def send(self, snap: Snapshot) -> PushRecord:
        """Load a snapshot into the engine between two engine steps and label it with its version.

        Raises PushError (the engine keeps its previous version) or VerifyError (see push).
        """
        with self._lock:
            t0, started = time.perf_counter(), time.monotonic()
            engine_seconds = 0.0
            path = None
            try:
                if snap.tensors:
                    request: dict[str, Any] = {"tensors": snap.tensors}
                    if self._t.wants_file:
                        path = self._write(snap)
                        request = {"path": str(path)}
                    with self._t.exclusive():
                        if hasattr(self._t, "push_tensors"):  # NCCL: validated and sent by the trainer
                            t1 = time.perf_counter()
                            try:
                                self._t.push_tensors(snap.tensors, self._specs())
                                reply = {"ok": True, "seconds": time.perf_counter() - t1}
                            except ValueError as err:
                                reply = {"error": str(err)}
                        else:
                            reply = self._t.rpc("apollo_push", request)
                        if "error" in reply:
                            if reply.get("broken"):
                                self._t.set_version("undefined")
                            state = "weights are undefined" if reply.get("broken") else "keeps its previous version"
                            raise PushError(
                                f"push of version {snap.version} failed, the engine {state}: {reply['error']}"
                            )
                        self._t.set_version(str(snap.version))
                        self._t.reset_caches()
                    engine_seconds = float(reply["seconds"])
                else:  # nothing changed: the served weights already are this version's
                    self._t.set_version(str(snap.version))
            finally:
                if path is not None:
                    path.unlink(missing_ok=True)
            self._sent.update(snap.digests)
            record = PushRecord(
                snap.version,
                snap.nbytes,
                len(snap.tensors),
                snap.partial,
                snap.seconds,
                time.perf_counter() - t0,
                engine_seconds,
                started=started,
            )
            self.records.append(record)
        if snap.reference is not None:
            self._verify(snap)
            record.verified = True
        return record

    def push(self, model: nn.Module, version: int, verify: bool = False) -> PushRecord:
        """Push the model's weights as `version` (e.g. the optimizer step); requests in flight keep streaming.

        verify=True then compares the engine's greedy tokens on the probe prompt with the trainer
        model's (computed before the push) and raises VerifyError on a difference.
        """
        return self.send(self.snapshot(model, version, verify))

    def _write(self, snap: Snapshot) -> Path:
        from ..vectors.io import write_safetensors

        fd, name = tempfile.mkstemp(prefix=f"apollo-push-{snap.version}-", suffix=".safetensors", dir=_shm_dir())
        os.close(fd)
        specs = [(k, tuple(t.shape), t.dtype) for k, t in snap.tensors.items()]
        return write_safetensors(name, specs, snap.tensors.__getitem__)

    def _verify(self, snap: Snapshot) -> None:
        ref, margins = snap.reference
        tokens, labels = self._t.greedy(self.probe, len(ref))
        if any(label not in (str(snap.version), "?") for label in labels):
            raise VerifyError(
                f"version {snap.version}: the probe was answered by versions {sorted(set(labels))} "
                "(another push came in between)"
            )
        for i, (a, b) in enumerate(zip(ref, tokens, strict=False)):
            if a != b:
                if margins[i] <= self.verify_tolerance:
                    return  # a near-tie for the trainer model: the two may part here
                raise VerifyError(
                    f"version {snap.version}: the engine's greedy tokens on the probe {self.probe} "
                    f"differ from the trainer model's at token {i} (trainer top-1 margin "
                    f"{margins[i]:.3g} > tolerance {self.verify_tolerance}): engine {tokens}, "
                    f"trainer {ref}"
                )

    # ---- steering
    def set_steering(self, vector, coefficient: float, layers=None) -> list[int]:
        """Add coefficient x direction to the chosen decoder layers' outputs inside the engine (prompt and
        generated tokens); replaces earlier steering. Requests in flight are recomputed steered."""
        from ..steering import SteeringVector

        if not isinstance(vector, SteeringVector):
            vector = SteeringVector.load(vector)
        info = self.info()
        if (vector.hidden_size, vector.num_layers) != (info["hidden_size"], info["num_layers"]):
            raise ValueError(
                f"steering vector is for hidden size {vector.hidden_size} and {vector.num_layers} layers; "
                f"the engine's model has {info['hidden_size']} and {info['num_layers']}"
            )
        fd, name = tempfile.mkstemp(prefix="apollo-steer-", suffix=".safetensors", dir=_shm_dir())
        os.close(fd)
        try:
            vector.save(name)
            reply = self._steer(
                {
                    "path": name,
                    "coefficient": float(coefficient),
                    "layers": None if layers is None else [int(i) for i in layers],
                }
            )
        finally:
            Path(name).unlink(missing_ok=True)
        return reply["layers"]

    def clear_steering(self) -> None:
        """Remove the steering: the engine computes exactly its unsteered output again."""
        self._steer({"clear": True})

    def _steer(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._t.exclusive():
            reply = self._t.rpc("apollo_steer", request)
            if "error" in reply:
                raise EngineError(f"steering failed: {reply['error']}")
            self._t.reset_caches()
        return reply

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The engine's greedy tokens for a prompt of token ids (EOS ignored)."""
        return self._t.greedy(list(prompt), max_tokens)[0]

    def close(self) -> None:
        self._t.close()


def connect_vllm(
    llm_or_url, *, transfer: str = "auto", nccl: dict | None = None, timeout: float = 600, **options
) -> VLLMHandle:
    """A handle on a running engine: an in-process `vllm.LLM` (see start_vllm), a server URL
    (`http://127.0.0.1:8000`, started with VLLM_SERVER_DEV_MODE=1 and our worker extension), or a
    `VLLMServer`.

    transfer: "auto" (in process: tensors are handed over; a server: a safetensors file in
    /dev/shm, so trainer and server share a host) or "nccl" (a GPU server started with
    `--weight-transfer-config '{"backend": "nccl"}'`; `nccl` holds master_address, master_port,
    world_size, packed; untested, see apollo_fast.serving.nccl). `timeout`: seconds for one HTTP
    call. Other options: see VLLMHandle.
    """
    if transfer not in ("auto", "nccl"):
        raise ValueError(f"transfer must be 'auto' or 'nccl', got {transfer!r}")
    target = getattr(llm_or_url, "url", llm_or_url)
    if isinstance(target, str):
        if not target.startswith(("http://", "https://")):
            raise ValueError(f"not a server URL: {target!r} (expected http://HOST:PORT)")
        transport = HttpTransport(target, timeout=timeout)
        if transfer == "nccl":
            from .nccl import NCCLTransport

            transport = NCCLTransport(transport, **(nccl or {}))
    else:
        if transfer == "nccl":
            raise ValueError("transfer='nccl' is for servers; an in-process engine gets the tensors directly")
        transport = InprocTransport(target)
    return VLLMHandle(transport, **options)
