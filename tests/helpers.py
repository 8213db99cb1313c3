"""Shared test helpers: one comparison that names the tensor and states the tolerance."""

from __future__ import annotations

import torch


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64 (inf when out has NaN/inf and ref does not)."""
    ref64, out64 = ref.detach().double().cpu(), out.detach().double().cpu()
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """Fail with the tensor's name unless relative error <= rtol (or the abs diff <= atol). NaN never passes."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref).any(), f"{name}: output has NaN"
    err = rel_err(ref, out)
    max_abs = (out.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item() if ref.numel() else 0.0
    assert err <= rtol or max_abs <= atol, (
        f"{name}: relative error {err:.3e} > {rtol:.1e} (max abs diff {max_abs:.3e}, atol {atol:.1e})"
    )
