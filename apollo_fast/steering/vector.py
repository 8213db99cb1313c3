"""`SteeringVector`: one direction per decoder layer, with the model's identity; saved as safetensors."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..vectors.io import write_safetensors
from .layers import decoder_layers, hidden_size

__all__ = ["SteeringVector", "FORMAT", "model_summary"]

FORMAT = "apollo_fast.steering_vector"


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Name, architecture, hidden size, layer count and weight fingerprint of a transformers model."""
    from ..vectors.sources import StateDictSource, model_identity

    ident = model_identity(StateDictSource(model))
    ident["hidden_size"] = hidden_size(model)
    ident["num_hidden_layers"] = len(decoder_layers(model))
    return ident


@dataclass
class SteeringVector:
    """directions[layer] is a (hidden_size,) fp32 vector added to that decoder layer's output."""

    directions: dict[int, torch.Tensor]
    hidden_size: int
    num_layers: int
    model: dict[str, Any] = field(default_factory=dict)
    method: str = "mean_diff"
    position: int = -1
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directions = {int(k): v.detach().float().cpu() for k, v in sorted(self.directions.items())}
        for layer, d in self.directions.items():
            if d.shape != (self.hidden_size,):
                raise ValueError(f"layer {layer}: direction shape {tuple(d.shape)} != ({self.hidden_size},)")
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"layer {layer} out of range for {self.num_layers} layers")

    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    def unit(self, layer: int) -> torch.Tensor:
        """The direction of `layer` normalised to length 1 (hidden,)."""
        d = self.directions[layer]
        return d / d.norm().clamp_min(1e-12)

    def check_compatible(self, model: nn.Module, check_weights: bool = False) -> None:
        """ValueError unless the model has this vector's hidden size and layer count; warns (or, with
        check_weights=True, raises) when the weights' fingerprint differs from the extraction model's."""
        h, n = hidden_size(model), len(decoder_layers(model))
        if h != self.hidden_size:
            raise ValueError(
                f"steering vector is for hidden size {self.hidden_size}, the model has {h} "
                f"(extracted from {self.model.get('name')!r})"
            )
        if n != self.num_layers:
            raise ValueError(
                f"steering vector is for a model with {self.num_layers} layers, the model has {n} "
                f"(extracted from {self.model.get('name')!r})"
            )
        if check_weights:
            fp = model_summary(model)["fingerprint"]
            if self.model.get("fingerprint") and fp != self.model["fingerprint"]:
                raise ValueError(
                    f"steering vector was extracted from another model ({self.model.get('name')!r}, "
                    f"fingerprint {self.model['fingerprint']}); this model's is {fp}"
                )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a .safetensors file (tensor 'layer.{i}' per layer, metadata: identity, dims, method), atomically."""
        from .. import __version__

        meta = {
            "format": FORMAT,
            "format_version": "1",
            "apollo_fast_version": __version__,
            "layers": json.dumps(self.layers),
            "hidden_size": str(self.hidden_size),
            "num_layers": str(self.num_layers),
            "model": json.dumps(self.model, sort_keys=True, allow_nan=False),
            "method": self.method,
            "position": str(self.position),
            "info": json.dumps(self.info, sort_keys=True, allow_nan=False),
        }
        specs = [(f"layer.{i}", (self.hidden_size,), torch.float32) for i in self.layers]
        return write_safetensors(path, specs, lambda name: self.directions[int(name.split(".")[1])], meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        """Read a file written by `save`; ValueError naming the file when it is not one."""
        from ..vectors.sources import SafetensorsSource

        src = SafetensorsSource(path)  # our reader: junk files get "not a safetensors file", not a parser error
        meta = src.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an apollo_fast steering vector (format={meta.get('format')!r})")
        try:
            layers = [int(i) for i in json.loads(meta["layers"])]
            directions = {i: src.get(f"layer.{i}") for i in layers}
            args = (int(meta["hidden_size"]), int(meta["num_layers"]), json.loads(meta["model"]))
            extra = (meta.get("method", "?"), int(meta.get("position", -1)), json.loads(meta.get("info", "{}")))
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: damaged steering vector ({type(err).__name__}: {err})") from None
        return cls(directions, *args, *extra)

    def warn_if_other_model(self, model: nn.Module) -> None:
        """check_compatible, then a warning (not an error) when the weights differ from the extraction model's."""
        self.check_compatible(model)
        fp = model_summary(model)["fingerprint"]
        if self.model.get("fingerprint") and fp != self.model["fingerprint"]:
            warnings.warn(
                f"steering vector was extracted from {self.model.get('name')!r} "
                f"(fingerprint {self.model['fingerprint']}), this model's fingerprint is {fp}",
                stacklevel=2,
            )
