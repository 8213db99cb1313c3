"""`APOLLO`: a drop-in torch.optim optimizer (APOLLO for matrices, AdamW for everything else).

State per APOLLO matrix (m x n, C = max(m, n) channels, rank r):
    step          0-dim fp32 CPU tensor, steps taken
    exp_avg       C x r fp32, first moment of the projected gradient
    exp_avg_sq    C x r fp32, second moment
    limiter_norm  0-dim fp32, the norm-growth limiter's previous ||S||_F
    proj, proj_seed   only with projection='official': the stored P~ and the next seed
State per AdamW tensor: step, exp_avg, exp_avg_sq (fp32, the parameter's shape).
The default projection ('philox') is regenerated from (parameter index, seed, refresh index),
so it is never stored. The state dict holds only tensors and Python scalars.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from .reference.apollo import adamw_update, apollo_update
from .reference.projection import (
    PROJECTIONS,
    effective_rank,
    official_next_seed,
    official_projection,
    philox_projection,
)

__all__ = ["APOLLO", "NonFiniteGradientError", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton", "cuda")
NONFINITE_POLICIES = ("raise", "skip")
APOLLO_MINI_ALPHA = math.sqrt(128.0)  # the official APOLLO-Mini `scale` is 128 = alpha^2


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or NaN and the optimizer was asked to raise (nonfinite='raise')."""


def _check_group_options(group: dict[str, Any]) -> None:
    """Validate one param group's options; raise ValueError naming the bad one."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element, got shape {tuple(lr.shape)}")
    elif not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr!r} (must be a finite number >= 0)")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not (isinstance(b, (int, float)) and 0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta{i + 1}: {b!r} (must be in [0, 1))")
    eps = group["eps"]
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"Invalid eps: {eps!r} (must be a finite number >= 0)")
    wd = group["weight_decay"]
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0.0):
        raise ValueError(f"Invalid weight_decay: {wd!r} (must be a finite number >= 0)")
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r} (must be an integer >= 1)")
    if group["scale_type"] not in ("channel", "tensor"):
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {group['scale_type']!r}")
    alpha = group["alpha"]
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0.0):
        raise ValueError(f"Invalid alpha: {alpha!r} (must be a finite number > 0)")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"Invalid update_proj_gap: {gap!r} (must be an integer >= 1)")
    limit = group["norm_growth_limit"]
    if limit is not None and not (isinstance(limit, (int, float)) and math.isfinite(limit) and limit >= 1.0):
        raise ValueError(f"Invalid norm_growth_limit: {limit!r} (must be >= 1.0, or None to disable)")
    if not isinstance(group["apollo"], bool):
        raise ValueError(f"apollo must be True or False, got {group['apollo']!r}")


def _resolve_alpha(group: dict[str, Any]) -> None:
    """Turn the official spelling `scale` (= alpha^2) into `alpha`, in place."""
    if "scale" not in group:
        return
    scale = group.pop("scale")
    if scale is None:
        return
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"Invalid scale: {scale!r} (must be > 0; it is alpha**2)")
    alpha = math.sqrt(scale)
    if group.get("alpha") is not None and not math.isclose(group["alpha"], alpha, rel_tol=1e-12):
        raise ValueError(f"alpha={group['alpha']} and scale={scale} disagree: scale must be alpha**2")
    group["alpha"] = alpha


class APOLLO(Optimizer):
    """APOLLO (arXiv 2412.05270) for 2-D weights, AdamW for every other parameter.

    Args:
        params: parameters, (name, parameter) pairs, or param-group dicts (any option below may be
            overridden per group; ``apollo=False`` sends a group's matrices to AdamW too).
        lr: learning rate (float, or a 1-element tensor).
        rank: rank r of the random projection (clamped to min(m, n) with the 'philox' projection).
        scale_type: 'channel' (one scaling factor per channel) or 'tensor' (one per matrix).
        alpha: the update scale. The official code's ``scale`` is alpha**2; pass either.
        scale: the official spelling, ``scale = alpha**2`` (alpha = sqrt(scale)).
        update_proj_gap: T, steps between projection redraws (P is drawn at steps 1, T+1, ...).
        norm_growth_limit: gamma of the norm-growth limiter; None disables it.
        betas, eps: Adam's moment coefficients and epsilon (eps is added to sqrt(V)).
        weight_decay: decoupled decay, W <- W - lr * wd * W, applied after the update.
        maximize: ascend instead of descend.
        projection: 'philox' (default; P regenerated from a counter-based generator keyed by
            (parameter index, seed, refresh index), never stored) or 'official' (drawn and stored
            exactly as apollo-torch 1.0.3 draws it, so that fp32 trajectories match it).
        seed: key of the 'philox' projection (ignored by 'official', whose seeds are 1, 2, ... by
            parameter position, as in apollo-torch).
        nonfinite: 'raise' (default) raises NonFiniteGradientError naming the parameter when a
            gradient holds inf/NaN, before anything is changed; 'skip' skips the whole step
            (no parameter or state changes) and counts it in ``skipped_steps``.
        backend: 'auto' (Triton on CUDA when available, else the reference), 'reference' (plain
            fp32 PyTorch, any device), 'triton', 'cuda'.
        capturable: (backend 'triton') step counters live on the device and lr may be a device
            tensor: step() makes no host sync and can be captured in a CUDA graph. Needs
            nonfinite='skip' (the skip is decided on the device) and projection='philox'.
        state_dtype: dtype of APOLLO's projected moments, torch.float32 (default) or torch.bfloat16
            (backend 'triton'; math stays fp32). AdamW moments are always fp32.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1e-3,
        rank: int = 256,
        *,
        scale_type: str = "channel",
        alpha: float | None = None,
        scale: float | None = None,
        update_proj_gap: int = 200,
        norm_growth_limit: float | None = 1.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        maximize: bool = False,
        projection: str = "philox",
        seed: int = 0,
        nonfinite: str = "raise",
        backend: str = "auto",
        capturable: bool = False,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        defaults = dict(
            lr=lr,
            rank=rank,
            scale_type=scale_type,
            alpha=alpha,
            scale=scale,
            update_proj_gap=update_proj_gap,
            norm_growth_limit=norm_growth_limit,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
            apollo=True,
        )
        _resolve_alpha(defaults)
        if defaults["alpha"] is None:
            defaults["alpha"] = 1.0
        _check_group_options(defaults)
        self.projection = projection
        self.seed = seed
        self.nonfinite = nonfinite
        self.backend = backend
        self.capturable = capturable
        self.state_dtype = state_dtype
        self.skipped_steps = 0
        self._param_index: dict[torch.Tensor, int] = {}
        self._proj_cache: dict[torch.Tensor, tuple[int, torch.Tensor]] = {}
        self._shapes: dict[torch.Tensor, torch.Size] = {}  # shape each state was made for
        super().__init__(params, defaults)
        self._backend_impl = self._resolve_backend(backend)

    @classmethod
    def mini(cls, params: Iterable[Any], lr: float | torch.Tensor = 1e-3, **kwargs: Any) -> APOLLO:
        """APOLLO-Mini: rank 1, tensor-wise scaling, alpha = sqrt(128) (the official scale 128)."""
        for key in ("rank", "scale_type"):
            if key in kwargs:
                raise ValueError(f"APOLLO.mini fixes {key}; use APOLLO(...) to choose it")
        if kwargs.get("alpha") is None and kwargs.get("scale") is None:
            kwargs["alpha"] = APOLLO_MINI_ALPHA
        return cls(params, lr=lr, rank=1, scale_type="tensor", **kwargs)

    # -- param groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = dict(param_group)
        _resolve_alpha(param_group)
        if param_group.get("alpha", 0) is None:
            del param_group["alpha"]
        if isinstance(param_group.get("betas"), list):
            param_group["betas"] = tuple(param_group["betas"])
        unknown = set(param_group) - set(self.defaults) - {"params", "param_names"}
        if unknown:
            raise ValueError(f"unknown param group option(s): {sorted(unknown)}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group_options(group)
        for p in group["params"]:
            if p not in self._param_index:
                # 1-based over all parameters of all groups, as apollo-torch numbers its seeds.
                self._param_index[p] = len(self._param_index) + 1

    # -- load/save ------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch.optim casts floating state to the parameter's dtype on load; ours has its own
        # dtypes (fp32 moments for bf16 weights), so take the saved tensors as they were.
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.clone() if key == "step" else value.to(p.device, copy=True)
        self._proj_cache.clear()
        self._shapes = {p: p.shape for p in self.state}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if "exp_avg" in self.state.get(p, {}):
                    have, need = tuple(self.state[p]["exp_avg"].shape), self._state_shape(group, p)
                    if have[0] != need[0] or (len(have) != len(need)):
                        raise ValueError(f"loaded state {have} does not fit {self._name(group, i, p)}")
        if self._backend_impl == "triton":
            self._fused.invalidate()  # its launch tables point at the replaced state tensors

    # -- the step -------------------------------------------------------------------------------

    def _resolve_backend(self, backend: str) -> str:
        from .fused_apollo import FusedApollo, triton_usable

        devices = {p.device for g in self.param_groups for p in g["params"]}
        if backend == "auto":
            on_cuda = bool(devices) and all(d.type == "cuda" and triton_usable(d) for d in devices)
            backend = "triton" if on_cuda else "reference"
        if not isinstance(self.capturable, bool):
            raise ValueError(f"capturable must be True or False, got {self.capturable!r}")
        if self.state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {self.state_dtype!r}")
        if backend == "reference":
            if self.capturable or self.state_dtype != torch.float32:
                raise ValueError("capturable=True and state_dtype=torch.bfloat16 need backend='triton'")
            return "reference"
        if backend == "triton":
            bad = sorted(str(d) for d in devices if not triton_usable(d))
            if importlib.util.find_spec("triton") is None:
                raise ValueError("backend='triton' needs the triton package (pip install triton)")
            if bad:
                raise ValueError(f"backend='triton' needs CUDA tensors (or CPU with TRITON_INTERPRET=1), got {bad}")
            if self.capturable and self.nonfinite == "raise":
                raise ValueError(
                    "capturable=True with nonfinite='raise' is unsupported: raising needs a host sync; "
                    "pass nonfinite='skip' (the skip is then decided on the device)"
                )
            if self.capturable and self.projection == "official":
                raise ValueError(
                    "capturable=True with projection='official' is unsupported (its redraw runs on the host)"
                )
            self._fused = FusedApollo(self)
            return "triton"
        raise NotImplementedError(f"backend={backend!r} is not available in this build; use 'triton' or 'reference'")

    def _name(self, group: dict[str, Any], i: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        where = names[i] if names else f"parameter #{self._param_index[p]}"
        return f"{where} (shape {tuple(p.shape)})"

    def _uses_apollo(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["apollo"] and p.dim() == 2

    def _collect(self) -> list[tuple[dict[str, Any], torch.Tensor, int]]:
        """The (group, param, index in group) triples to update, after checking every gradient's form.

        Names are formatted only for errors: this runs every step, for every parameter."""
        work = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                made_for = self._shapes.get(p)
                if (
                    grad.is_sparse
                    or grad.shape != p.shape
                    or not p.is_floating_point()
                    or (made_for is not None and made_for != p.shape)
                ):
                    self._raise_bad_param(group, i, p, made_for)
                work.append((group, p, i))
        return work

    def _raise_bad_param(self, group: dict[str, Any], i: int, p: torch.Tensor, made_for: Any) -> None:
        name = self._name(group, i, p)
        if p.grad.is_sparse:
            raise RuntimeError(f"APOLLO does not support sparse gradients: {name}")
        if p.grad.shape != p.shape:
            raise ValueError(f"gradient shape {tuple(p.grad.shape)} does not match {name}")
        if not p.is_floating_point():
            raise TypeError(f"APOLLO needs floating-point parameters: {name} is {p.dtype}")
        raise ValueError(f"{name} changed shape since its optimizer state was made for {tuple(made_for)}")

    def _state_shape(self, group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
        if not self._uses_apollo(group, p):
            return tuple(p.shape)
        return (max(p.shape), effective_rank(group["rank"], p.shape, self.projection))

    def _grads_finite(self, work: list[tuple[dict[str, Any], torch.Tensor, int]]) -> bool:
        """True when every gradient is finite; raises under nonfinite='raise'. One host sync."""
        if not work:
            return True
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, p, _) in enumerate(work):
            by_device.setdefault(p.grad.device, []).append(i)
        flags = torch.empty(len(work), dtype=torch.bool)
        for idx in by_device.values():  # one device-to-host copy per device
            flags[idx] = torch.stack([torch.isfinite(work[i][1].grad).all() for i in idx]).cpu()
        if bool(flags.all()):
            return True
        if self.nonfinite == "raise":
            bad = [self._name(g, i, p) for (g, p, i), ok in zip(work, flags.tolist(), strict=True) if not ok]
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or NaN) in {', '.join(bad)}; nothing was updated. "
                "Pass nonfinite='skip' to skip such steps instead."
            )
        return False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; `closure` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        if self._backend_impl == "triton":
            self._fused.step(work)
            return loss
        if not self._grads_finite(work):
            self.skipped_steps += 1
            return loss
        for group, p, _ in work:
            self._step_reference(group, p)
        return loss

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "exp_avg" in state:
            return state
        shape = self._state_shape(group, p)
        self._shapes[p] = p.shape
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        if self._uses_apollo(group, p):
            state["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=p.device)
            if self.projection == "official":
                state["proj_seed"] = self._param_index[p]
        return state

    def _projection(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any], step: int):
        """P~ (r x d, fp32) for this step: redrawn at steps 1, T+1, 2T+1, ..."""
        rank = state["exp_avg"].shape[1]
        dim = min(p.shape)
        refresh = (step - 1) // group["update_proj_gap"]
        if self.projection == "official":
            if "proj" not in state or (step - 1) % group["update_proj_gap"] == 0:
                seed = state["proj_seed"]
                state["proj"] = official_projection(rank, dim, seed, p.device, tall=p.shape[0] >= p.shape[1])
                state["proj_seed"] = official_next_seed(seed)
            return state["proj"]
        cached = self._proj_cache.get(p)
        if cached is None or cached[0] != refresh:
            proj = philox_projection(rank, dim, self._param_index[p] - 1, self.seed, refresh, p.device)
            self._proj_cache[p] = cached = (refresh, proj)
        return cached[1]

    def _step_reference(self, group: dict[str, Any], p: torch.Tensor) -> None:
        state = self._init_state(group, p)
        state["step"] += 1
        step = int(state["step"].item())  # a CPU tensor: no device sync
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        if self._uses_apollo(group, p):
            apollo_update(
                p,
                p.grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                state["limiter_norm"],
                self._projection(group, p, state, step),
                step=step,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                alpha=group["alpha"],
                scale_type=group["scale_type"],
                norm_growth_limit=group["norm_growth_limit"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
        else:
            adamw_update(
                p,
                p.grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                step=step,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
            )
