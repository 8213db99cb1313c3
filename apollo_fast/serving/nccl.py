"""GPU servers: pushes over NCCL with vLLM's own weight-transfer engine instead of a file.

UNTESTED: written against vLLM 0.32's `vllm.distributed.weight_transfer` API (the CPU build's
copy of it) without a GPU to run it on. The server needs
`--weight-transfer-config '{"backend": "nccl"}'` besides what `serve_vllm` passes; the trainer's
GPU and the server's GPUs must reach each other (NCCL), and `world_size` is 1 (the trainer,
rank 0) plus the server's GPU workers.

The transfer is vLLM's: `start_weight_update` (layerwise reload begins), `update_weights` on the
server while the trainer broadcasts the tensors, `finish_weight_update`. It runs inside the same
pause(keep)/resume window as file pushes, so no engine step sees half-loaded weights (pushing
without the pause crashed the engine on the CPU build: a step ran on meta tensors mid-reload).
The worker cannot see NCCL tensors before they are loaded, so the checks a file push gets in the
worker (names, shapes, finite values, whole fusion groups) run on the trainer side first.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["NCCLTransport"]


class NCCLTransport:
    """An HttpTransport whose payload goes over NCCL: `connect_vllm(url, transfer="nccl", ...)`."""

    wants_file = False
    payload_device = "cuda"

    def __init__(
        self,
        http,
        *,
        master_address: str = "127.0.0.1",
        master_port: int = 29551,
        world_size: int = 2,
        packed: bool = True,
    ) -> None:
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        if not torch.cuda.is_available():
            raise ValueError("transfer='nccl' needs a CUDA GPU on the trainer side")
        self.http = http
        self._source = _Source()
        init = NCCLTrainerInitInfo(
            master_address=master_address,
            master_port=int(master_port),
            world_size=int(world_size),
            packed=packed,
            rank=0,
        )
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(
            init, client=HTTPVLLMWeightSyncClient(http.url, timeout=http.timeout), source=self._source
        )

    def __getattr__(self, name: str) -> Any:  # rpc, exclusive, versions, caches, greedy: the HTTP routes
        return getattr(self.http, name)

    def push_tensors(self, tensors: dict[str, torch.Tensor], specs: dict) -> None:
        """Broadcast `tensors` (CUDA, checkpoint names) into the server; call inside `exclusive()`."""
        from .worker import _validate

        problems = _validate(tensors, specs)
        if problems:
            raise ValueError("push refused, the engine keeps its weights: " + "; ".join(problems[:10]))
        self._source.tensors = tensors
        try:
            self._engine.send_weights()
        finally:
            self._source.tensors = {}

    def close(self) -> None:
        self._engine.shutdown()


def _source_base():
    from vllm.distributed.weight_transfer.base import WeightSource

    return WeightSource


class _Source:
    """vLLM's WeightSource over the snapshot of one push (made a subclass lazily: vllm is optional)."""

    def __new__(cls):
        base = _source_base()

        class Source(base):
            tensors: dict[str, torch.Tensor] = {}

            def metadata(self):
                from vllm.distributed.weight_transfer.base import ParamMeta

                return [ParamMeta(k, t.dtype, tuple(t.shape)) for k, t in sorted(self.tensors.items())]

            def __iter__(self):
                return iter(sorted(self.tensors.items()))

        return Source()
