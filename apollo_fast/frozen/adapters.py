"""Per-architecture adapters: which transformers modules a frozen-context forward drives, and how.

We never call a decoder layer's or a token mixer's `forward` (transformers' cache writes into its GDN state
in place, so a frozen context would be overwritten); we call the position-wise sub-modules (norms,
projections, MLP/MoE, gated norm) and do the token mixing (attention, causal conv, delta rule) ourselves.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelParts", "AttentionAdapter", "GDNAdapter", "model_parts", "SUPPORTED_MODELS"]

# Causal-LM class -> (attention classes it may contain, GDN classes it may contain).
SUPPORTED_MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "LlamaForCausalLM": (("LlamaAttention",), ()),
    "Qwen3ForCausalLM": (("Qwen3Attention",), ()),
    "Qwen3_5ForCausalLM": (("Qwen3_5Attention",), ("Qwen3_5GatedDeltaNet",)),
    "Qwen3NextForCausalLM": (("Qwen3NextAttention",), ("Qwen3NextGatedDeltaNet",)),
}


def rotary_cos_sin(rotary: nn.Module, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, T, R] of the model's own rotary module at positions [1, T].

    Qwen3.5's text rotary (multimodal RoPE, `mrope_section`) takes position ids per section,
    [3, B, T]: transformers 5.24 expands [B, T] itself, 5.17 requires the expanded form, which both accept.
    """
    if hasattr(rotary, "mrope_section"):
        positions = positions.unsqueeze(0).expand(3, -1, -1)
    return rotary(h, positions)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half convention) on the first cos.shape[-1] dims of x [B, H, T, D]; cos/sin [B|1, T, R]."""
    r = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@dataclass(frozen=True)
class AttentionAdapter:
    """Drives a softmax-attention module: q/k/v (+ optional per-head q/k norms and output gate), o_proj."""

    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    gated: bool  # Qwen3.5/Qwen3-Next: q_proj also emits a sigmoid gate on the attention output
    qk_norm: bool

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, T, d] -> q [B, H, T, D], k, v [B, Hkv, T, D] (RoPE applied), gate [B, T, H*D] or None."""
        m, (b, t) = self.module, x.shape[:2]
        gate = None
        if self.gated:
            qg = m.q_proj(x).view(b, t, self.num_heads, 2 * self.head_dim)
            q, gate = qg[..., : self.head_dim], qg[..., self.head_dim :].reshape(b, t, -1)
        else:
            q = m.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = m.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = m.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = m.q_norm(q), m.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return rotate(q, cos, sin), rotate(k, cos, sin), v, gate

    def output(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """o [B, H, T, D] -> [B, T, d]."""
        b, _, t, _ = o.shape
        o = o.transpose(1, 2).reshape(b, t, -1)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.module.o_proj(o)


@dataclass(frozen=True)
class GDNAdapter:
    """Drives a Gated-DeltaNet module: in-projections, depthwise conv weights, gates, gated norm, out_proj."""

    module: nn.Module
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    fused_projections: bool  # Qwen3-Next: in_proj_qkvz / in_proj_ba grouped per key head

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> qkv [B, T, 2*Hk*dk + Hv*dv] (conv input), z [B, T, Hv, dv], b, a [B, T, Hv]."""
        m, (bsz, t) = self.module, x.shape[:2]
        if not self.fused_projections:
            z = m.in_proj_z(x).view(bsz, t, self.num_v_heads, self.head_v_dim)
            return m.in_proj_qkv(x), z, m.in_proj_b(x), m.in_proj_a(x)
        # Fused layout per key head g: [q_g (dk) | k_g (dk) | v_g (r*dv) | z_g (r*dv)] and [b_g (r) | a_g (r)].
        hk, dk, dv, r = self.num_k_heads, self.head_k_dim, self.head_v_dim, self.num_v_heads // self.num_k_heads
        qkvz = m.in_proj_qkvz(x).view(bsz, t, hk, 2 * dk + 2 * r * dv)
        q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=-1)
        ba = m.in_proj_ba(x).view(bsz, t, hk, 2 * r)
        b, a = ba[..., :r].reshape(bsz, t, -1), ba[..., r:].reshape(bsz, t, -1)
        qkv = torch.cat((q.reshape(bsz, t, -1), k.reshape(bsz, t, -1), v.reshape(bsz, t, -1)), dim=-1)
        return qkv, z.reshape(bsz, t, self.num_v_heads, dv), b, a

    @property
    def conv_weight(self) -> torch.Tensor:
        """[C, K] depthwise causal conv kernel (applied with SiLU, no bias)."""
        return self.module.conv1d.weight.squeeze(1)

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [B, T, C] -> q, k [B, T, Hk, dk], v [B, T, Hv, dv]."""
        bsz, t = qkv.shape[:2]
        q, k, v = torch.split(qkv, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (
            q.reshape(bsz, t, self.num_k_heads, self.head_k_dim),
            k.reshape(bsz, t, self.num_k_heads, self.head_k_dim),
            v.reshape(bsz, t, self.num_v_heads, self.head_v_dim),
        )

    def output(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """o, z [B, T, Hv, dv] -> gated RMS norm over dv -> out_proj -> [B, T, d]."""
        bsz, t = o.shape[:2]
        o = self.module.norm(o.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.module.out_proj(o.reshape(bsz, t, -1))


@dataclass(frozen=True)
class ModelParts:
    """The modules of a supported causal LM that the frozen-context forward drives."""

    arch: str
    embed: nn.Module
    layers: tuple[nn.Module, ...]
    mixers: tuple[AttentionAdapter | GDNAdapter, ...]
    final_norm: nn.Module
    lm_head: nn.Module
    rotary: nn.Module | None


def _attention_adapter(module: nn.Module, config) -> AttentionAdapter:
    cls = type(module).__name__
    if getattr(module, "sliding_window", None):
        raise ValueError(f"frozen context: sliding-window attention ({cls}) is not supported")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return AttentionAdapter(
        module=module,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=module.head_dim,
        scaling=float(module.scaling),
        gated=module.q_proj.out_features == 2 * heads * module.head_dim,
        qk_norm=hasattr(module, "q_norm"),
    )


def _gdn_adapter(module: nn.Module) -> GDNAdapter:
    if module.num_v_heads % module.num_k_heads:
        raise ValueError(f"frozen context: GDN value heads {module.num_v_heads} not a multiple of {module.num_k_heads}")
    if module.conv1d.bias is not None or module.activation not in ("silu", "swish"):
        raise ValueError(f"frozen context: GDN conv with bias or activation {module.activation!r} is not supported")
    return GDNAdapter(
        module=module,
        num_k_heads=module.num_k_heads,
        num_v_heads=module.num_v_heads,
        head_k_dim=module.head_k_dim,
        head_v_dim=module.head_v_dim,
        fused_projections=hasattr(module, "in_proj_qkvz"),
    )


_PARTS: weakref.WeakKeyDictionary[nn.Module, ModelParts] = weakref.WeakKeyDictionary()


def model_parts(model: nn.Module) -> ModelParts:
    """Check that `model` is a supported causal LM and return its parts; ValueError naming what is not supported."""
    parts = _PARTS.get(model)
    if parts is None or len(parts.layers) != len(model.model.layers):
        parts = _PARTS[model] = _build_parts(model)
    return parts


def class_name(module: nn.Module) -> str:
    """The module's class name; for a module sharded by FSDP2 (whose class fully_shard replaces by a subclass
    named FSDP<name>), the name of the class it had."""
    cls = type(module)
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule):
            cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls.__name__


def _build_parts(model: nn.Module) -> ModelParts:
    arch = class_name(model)
    if arch not in SUPPORTED_MODELS:
        raise ValueError(
            f"frozen context: model class {arch} is not supported (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    attn_classes, gdn_classes = SUPPORTED_MODELS[arch]
    base = model.model
    mixers: list[AttentionAdapter | GDNAdapter] = []
    for i, layer in enumerate(base.layers):
        attn, gdn = getattr(layer, "self_attn", None), getattr(layer, "linear_attn", None)
        if attn is not None and class_name(attn) in attn_classes:
            mixers.append(_attention_adapter(attn, model.config))
        elif gdn is not None and class_name(gdn) in gdn_classes:
            mixers.append(_gdn_adapter(gdn))
        else:
            found = class_name(attn if attn is not None else gdn)
            raise ValueError(f"frozen context: layer {i} of {arch} has an unsupported token mixer {found}")
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            if not hasattr(layer, name):
                raise ValueError(f"frozen context: layer {i} of {arch} has no {name}; unsupported layer layout")
    return ModelParts(
        arch=arch,
        embed=base.embed_tokens,
        layers=tuple(base.layers),
        mixers=tuple(mixers),
        final_norm=base.norm,
        lm_head=model.lm_head,
        rotary=getattr(base, "rotary_emb", None),
    )
