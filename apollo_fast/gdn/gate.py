"""`gate(a, b, A_log, dt_bias)` -> (g, beta): the GDN gates with exact per-head parameter gradients."""

from __future__ import annotations

import torch

from ..backend import resolve_backend
from .naive import gate_ref

__all__ = ["gate"]


class _GateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, A_log, dt_bias):
        from apollo_fast.kernels.gdn_gate import gdn_gate_fwd

        A_c, bias_c = A_log.contiguous(), dt_bias.contiguous()
        g, beta = gdn_gate_fwd(a, b, A_c, bias_c)
        ctx.save_for_backward(a, b, A_c, bias_c)
        ctx.param_dtypes = (A_log.dtype, dt_bias.dtype)
        return g, beta

    @staticmethod
    def backward(ctx, dg, dbeta):
        from apollo_fast.kernels.gdn_gate import gdn_gate_bwd

        a, b, A_log, dt_bias = ctx.saved_tensors
        if dg is None:
            dg = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        if dbeta is None:
            dbeta = torch.zeros(b.shape, dtype=b.dtype, device=b.device)
        da, db, dA_part, dbias_part = gdn_gate_bwd(a, b, A_log, dt_bias, dg, dbeta)
        # second stage: a few hundred partials (value and Kahan compensation) added in fp64, fixed order
        dA_log = dA_part.double().sum((0, 1)).to(ctx.param_dtypes[0])
        ddt_bias = dbias_part.double().sum((0, 1)).to(ctx.param_dtypes[1])
        return da, db, dA_log, ddt_bias


def _validate(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b), ("A_log", A_log), ("dt_bias", dt_bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gate: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"gate: {name} must be floating point, got {t.dtype}")
    if a.dim() != 3:
        raise ValueError(f"gate: a must be [B, T, Hv], got shape {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"gate: b shape {tuple(b.shape)} != a shape {tuple(a.shape)}")
    hv = a.shape[2]
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if t.shape != (hv,):
            raise ValueError(f"gate: {name} must be [Hv] = [{hv}], got shape {tuple(t.shape)}")
    devices = {t.device for t in (a, b, A_log, dt_bias)}
    if len(devices) != 1:
        raise ValueError(f"gate: all inputs must be on one device, got {sorted(str(d) for d in devices)}")


def gate(
    a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b [B, T, Hv] (any strides); A_log, dt_bias [Hv] -> g = -exp(A_log) softplus(a + dt_bias) fp32 and
    beta = sigmoid(b) in b's dtype, both [B, T, Hv]; differentiable w.r.t. all four inputs.
    backend: 'auto' | 'reference' | 'triton' (apollo_fast.backend; fp64 inputs run on the reference)."""
    _validate(a, b, A_log, dt_bias)
    fp64 = torch.float64 in (a.dtype, b.dtype, A_log.dtype, dt_bias.dtype)
    chosen = resolve_backend(backend, {a.device}, op="gate", unsupported="fp64 inputs" if fp64 else None)
    if chosen == "reference":
        return gate_ref(a, b, A_log, dt_bias)
    return _GateFunction.apply(a, b, A_log, dt_bias)
