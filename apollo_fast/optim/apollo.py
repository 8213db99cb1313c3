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

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from ..backend import resolve_backend
from ..reference.projection import PROJECTIONS, effective_rank, official_next_seed, official_projection
from ..reference.rounding import LOW_PRECISION, PARAM_ROUNDINGS
from .functional import AdamwLists, ApolloLists, Hyper, adamw_reference, apollo_reference
from .fused import (
    FusedLaunches,
    fused_adamw,
    fused_adamw_check,
    fused_apollo_project,
    fused_apollo_update,
    tl_dtype,
)
from .placement import ShardSpec, shard_spec
from .sharded import moments_state

__all__ = ["APOLLO", "NonFiniteGradientError"]

NONFINITE_POLICIES = ("raise", "skip")
APOLLO_MINI_ALPHA = math.sqrt(128.0)  # the official APOLLO-Mini `scale` is 128 = alpha^2
# bf16/fp16 parameters: keep each element's rounding residual (README, "bf16 weights"); fp32 ignores it
DEFAULT_PARAM_ROUNDING = "compensated"


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
    if group["param_rounding"] not in PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be one of {PARAM_ROUNDINGS}, got {group['param_rounding']!r}")
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
        weight_decay: decoupled decay, W <- W - (lr * wd) * W after the update (one rounding, as apollo-torch);
            AdamW tensors decay first, W <- W * (1 - lr * wd), as torch.optim.AdamW.
        maximize: ascend instead of descend.
        projection: 'philox' (default; P regenerated from a counter-based generator keyed by
            (parameter index, seed, refresh index), never stored) or 'official' (drawn and stored
            exactly as apollo-torch 1.0.3 draws it, so that fp32 trajectories match it).
        seed: key of the 'philox' projection (ignored by 'official', whose seeds are 1, 2, ... by
            parameter position, as in apollo-torch).
        nonfinite: 'raise' (default) raises NonFiniteGradientError naming the parameter when a
            gradient holds inf/NaN, before anything is changed; 'skip' skips the whole step
            (no parameter or state changes) and counts it in ``skipped_steps``.
        backend: 'auto' (Triton when every parameter is on CUDA, else the reference), 'reference' (plain
            fp32 PyTorch, any device) or 'triton' (the rule of apollo_fast.backend).
        capturable: (backend 'triton') step counters live on the device and lr may be a device
            tensor: step() makes no host sync and can be captured in a CUDA graph. Needs
            nonfinite='skip' (the skip is decided on the device) and projection='philox'.
        state_dtype: dtype of APOLLO's projected moments, torch.float32 (default) or torch.bfloat16
            (backend 'triton'; math stays fp32). AdamW moments are always fp32.
        param_rounding: how the fp32 result is stored into bf16/fp16 parameters (fp32 ones ignore it):
            'compensated' (default: a bf16 residual per element, carried to the next step; optimizer
            state), 'stochastic' (unbiased, bits from Philox keyed by (parameter index, seed, step,
            element); no memory) or 'nearest' (updates below half an ulp are lost).
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
        param_rounding: str = DEFAULT_PARAM_ROUNDING,
    ) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
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
            param_rounding=param_rounding,
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
        self.skipped_steps = 0  # steps skipped for non-finite gradients (host-decided)
        self.skipped_steps_device: dict[torch.device, torch.Tensor] = {}  # capturable 'skip': device counters
        self._param_index: dict[torch.Tensor, int] = {}
        self._where: dict[torch.Tensor, tuple[int, int]] = {}  # parameter -> (group index, index in group)
        self._proj_cache: dict = {}  # regenerated Philox P~ of the reference backend
        self._shapes: dict[torch.Tensor, torch.Size] = {}  # shape each state was made for
        # Triton launch tables per (param group index, part): part None for step(), the caller's key for
        # step_params(), so that each part of a model stepped separately keeps its own tables
        self._launches: dict[tuple[int, Hashable], FusedLaunches] = {}
        self._found_inf: dict[torch.device, torch.Tensor] = {}
        self._specs: dict[torch.Tensor, ShardSpec | None] = {}  # sharded (DTensor) parameters: their shard
        self._poison_scratch = False  # tests: NaN-fill the Triton backend's scratch before every launch
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
        for i, p in enumerate(group["params"]):
            if p not in self._param_index:
                # 1-based over all parameters of all groups, as apollo-torch numbers its seeds.
                self._param_index[p] = len(self._param_index) + 1
            self._where.setdefault(p, (len(self.param_groups) - 1, i))

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
        self._launches.clear()  # their tables point at the replaced state tensors
        self._shapes = {p: p.shape for p in self.state}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if "exp_avg" in self.state.get(p, {}):
                    have, need = tuple(self.state[p]["exp_avg"].shape), self._state_shape(group, p)
                    if have[0] != need[0] or (len(have) != len(need)):
                        raise ValueError(f"loaded state {have} does not fit {self._name(group, i, p)}")

    # -- the step -------------------------------------------------------------------------------

    def _resolve_backend(self, backend: str) -> str:
        if not isinstance(self.capturable, bool):
            raise ValueError(f"capturable must be True or False, got {self.capturable!r}")
        if self.state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {self.state_dtype!r}")
        devices = {p.device for g in self.param_groups for p in g["params"]}
        chosen = resolve_backend(backend, devices, op="APOLLO")
        if chosen == "reference":
            if self.capturable or self.state_dtype != torch.float32:
                raise ValueError("capturable=True and state_dtype=torch.bfloat16 need backend='triton'")
            return chosen
        if self.capturable and self.nonfinite == "raise":
            raise ValueError(
                "capturable=True with nonfinite='raise' is unsupported: raising needs a host sync; "
                "pass nonfinite='skip' (the skip is then decided on the device)"
            )
        if self.capturable and self.projection == "official":
            raise ValueError("capturable=True with projection='official' is unsupported (its redraw runs on the host)")
        return chosen

    def _name(self, group: dict[str, Any], i: int, p: torch.Tensor) -> str:
        names = group.get("param_names")
        where = names[i] if names else f"parameter #{self._param_index[p]}"
        return f"{where} (shape {tuple(p.shape)})"

    def _uses_apollo(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        return group["apollo"] and p.dim() == 2

    def _collect(
        self, params: Iterable[torch.Tensor] | None = None
    ) -> list[tuple[int, dict[str, Any], list[tuple[int, torch.Tensor]]]]:
        """Per param group with work: (group index, group, [(index in group, param)]), every gradient checked.

        params: only these parameters (step_params); None: every parameter of every group.
        Names are formatted only for errors: this runs every step, for every parameter."""
        triton = self._backend_impl == "triton"
        if params is None:
            chosen = [(gi, range(len(g["params"]))) for gi, g in enumerate(self.param_groups)]
        else:
            by_group: dict[int, list[int]] = {}
            for p in params:
                if p not in self._where:
                    raise ValueError(f"step_params: a parameter of shape {tuple(p.shape)} is not in this optimizer")
                gi, i = self._where[p]
                by_group.setdefault(gi, []).append(i)
            chosen = [(gi, sorted(set(by_group[gi]))) for gi in sorted(by_group)]
        work = []
        for gi, indices in chosen:
            group = self.param_groups[gi]
            entries = []
            for i in indices:
                p = group["params"][i]
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
                if triton:
                    self._check_triton_param(group, i, p)
                entries.append((i, p))
            if entries:
                work.append((gi, group, entries))
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

    def _check_triton_param(self, group: dict[str, Any], i: int, p: torch.Tensor) -> None:
        """What the Triton kernels need of a parameter, checked with its name before anything launches."""
        if not _local(p).is_contiguous():
            raise ValueError(f"backend='triton' needs contiguous parameters: {self._name(group, i, p)} is not")
        for dt in (p.dtype, p.grad.dtype):
            tl_dtype(dt)  # raises TypeError naming an unsupported dtype
        if self._uses_apollo(group, p) and self.projection == "philox" and p not in self._shapes:
            if self._state_shape(group, p)[1] * min(p.shape) >= 2**32:
                raise ValueError(
                    f"{self._name(group, i, p)}: rank x min(m, n) must stay below 2**32 for the Philox projection"
                )

    def _state_shape(self, group: dict[str, Any], p: torch.Tensor) -> tuple[int, ...]:
        if not self._uses_apollo(group, p):
            return tuple(p.shape)
        return (max(p.shape), effective_rank(group["rank"], p.shape, self.projection))

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """The parameter's state, made on first use; placed as the backend needs it (capturable: step on the
        device; bf16 moments with state_dtype)."""
        state = self.state[p]
        if "exp_avg" not in state:
            shape = self._state_shape(group, p)
            self._shapes[p] = p.shape
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = self._moments(group, p, shape)
            state["exp_avg_sq"] = self._moments(group, p, shape)
            if self._uses_apollo(group, p):
                state["limiter_norm"] = torch.zeros((), dtype=torch.float32, device=p.device)
                if self.projection == "official":
                    state["proj_seed"] = self._param_index[p]
        if self.capturable and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device, non_blocking=True)
        elif not self.capturable and state["step"].device.type != "cpu":
            state["step"] = state["step"].cpu()  # a state saved capturable, loaded here: one sync, once
        if self._uses_apollo(group, p):
            for k in ("exp_avg", "exp_avg_sq"):
                if state[k].dtype != self.state_dtype:
                    state[k] = state[k].to(self.state_dtype)
        if p.dtype in LOW_PRECISION and group["param_rounding"] == "compensated" and "compensation" not in state:
            state["compensation"] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.contiguous_format)
        return state

    def _moments(self, group: dict[str, Any], p: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Zero moments: fp32 tensors of `shape`; for a sharded parameter DTensors sharded as the step uses them
        (AdamW: like the parameter; APOLLO: over the C channels), so checkpoints can reshard them."""
        spec = self._spec(group, p)
        if spec is None:
            return torch.zeros(shape, dtype=torch.float32, device=p.device)
        if not self._uses_apollo(group, p):
            return torch.zeros_like(p, dtype=torch.float32)
        return moments_state(spec, shape, p.device)

    def _spec(self, group: dict[str, Any], p: torch.Tensor) -> ShardSpec | None:
        """Where this rank's shard of `p` lies (None for a plain tensor); checked once per parameter."""
        if p not in self._specs:
            self._specs[p] = shard_spec(p, self._name(group, self._where[p][1], p))
        return self._specs[p]

    def _compensation(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> torch.Tensor | None:
        """The rounding residual this step carries (None unless a 16-bit parameter in 'compensated' mode)."""
        if p.dtype in LOW_PRECISION and group["param_rounding"] == "compensated":
            return state["compensation"]
        return None

    def _official_projection(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """projection='official': the stored P~ for this step, redrawn at steps 1, T+1, 2T+1, ..."""
        step = int(state["step"].item()) + 1  # a CPU tensor (official is never capturable): no sync
        if "proj" not in state or (step - 1) % group["update_proj_gap"] == 0:
            seed = state["proj_seed"]
            rank, dim = state["exp_avg"].shape[1], min(p.shape)
            state["proj"] = official_projection(rank, dim, seed, p.device, tall=p.shape[0] >= p.shape[1])
            state["proj_seed"] = official_next_seed(seed)
        return state["proj"]

    def _lists(
        self, group: dict[str, Any], entries: list[tuple[int, torch.Tensor]], undo: list
    ) -> tuple[ApolloLists, AdamwLists]:
        """The group's step inputs. `undo` receives what an 'official' redraw replaced, so that a step refused
        for a non-finite gradient can put it back."""
        ap = ApolloLists([], [], [], [], [], [], [], [], [])
        aw = AdamwLists([], [], [], [], [], [], [])
        contiguous = self._backend_impl == "triton"
        for _, p in entries:
            state = self._init_state(group, p)
            spec = self._spec(group, p)
            grad = p.grad.contiguous() if contiguous else p.grad
            comp = self._compensation(group, p, state)
            param, exp_avg, exp_avg_sq = p, state["exp_avg"], state["exp_avg_sq"]
            if spec is not None:  # the functional steps work on this rank's shards
                param, grad, exp_avg, exp_avg_sq = (x.to_local() for x in (p, grad, exp_avg, exp_avg_sq))
                comp = None if comp is None else comp.to_local()
            if not self._uses_apollo(group, p):
                for lst, v in zip(
                    (aw.params, aw.grads, aw.exp_avgs, aw.exp_avg_sqs, aw.steps, aw.keys, aw.compensations, aw.shards),
                    (param, grad, exp_avg, exp_avg_sq, state["step"], self._param_index[p] - 1, comp, spec),
                    strict=True,
                ):
                    lst.append(v)
                continue
            proj = None
            if self.projection == "official":
                undo.append((state, {k: state[k] for k in ("proj", "proj_seed") if k in state}))
                proj = self._official_projection(group, p, state)
            for lst, v in zip(
                (ap.params, ap.grads, ap.exp_avgs, ap.exp_avg_sqs, ap.limiter_norms, ap.steps, ap.keys, ap.projections,
                 ap.compensations, ap.shards),
                (param, grad, exp_avg, exp_avg_sq, state["limiter_norm"], state["step"], self._param_index[p] - 1,
                 proj, comp, spec),
                strict=True,
            ):  # fmt: skip
                lst.append(v)
        return ap, aw

    def _grads_finite(self, work: list) -> bool:
        """True when every gradient is finite; raises under nonfinite='raise'. One host sync."""
        items = [(g, i, p) for _, g, entries in work for i, p in entries]
        by_device: dict[torch.device, list[int]] = {}
        for k, (_, _, p) in enumerate(items):
            by_device.setdefault(p.grad.device, []).append(k)
        flags = torch.empty(len(items), dtype=torch.bool)
        for idx in by_device.values():  # one device-to-host copy per device
            flags[idx] = torch.stack([torch.isfinite(_local(items[k][2].grad)).all() for k in idx]).cpu()
        sharded = [(k, self._spec(g, p)) for k, (g, _, p) in enumerate(items) if self._spec(g, p) is not None]
        if sharded:  # every rank must take the same decision: a shard's flag is its parameter's on every rank
            flags = self._agree(flags, sharded)
        if bool(flags.all()):
            return True
        if self.nonfinite == "raise":
            bad = [self._name(g, i, p) for (g, i, p), ok in zip(items, flags.tolist(), strict=True) if not ok]
            raise NonFiniteGradientError(
                f"non-finite gradient (inf or NaN) in {', '.join(bad)}; nothing was updated. "
                "Pass nonfinite='skip' to skip such steps instead."
            )
        return False

    @staticmethod
    def _agree(flags: torch.Tensor, sharded: list[tuple[int, ShardSpec]]) -> torch.Tensor:
        """Finite-flags of sharded parameters AND-ed over their ranks (one all-reduce per process group)."""
        flags = flags.clone()
        by_group: dict[Any, list[int]] = {}
        for k, spec in sharded:
            by_group.setdefault(spec.group, []).append(k)
        for group, idx in by_group.items():
            device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
            bad = (~flags[idx]).to(device=device, dtype=torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
            flags[idx] = bad.cpu() == 0
        return flags

    def _agree_found(self, work: list) -> None:
        """Triton backend with sharded parameters: the found-inf flags MAX-reduced over each process group, on the
        device (no host sync), so that every rank skips, raises or steps together."""
        seen: dict[Any, torch.device] = {}
        for _, group, entries in work:
            for _, p in entries:
                spec = self._spec(group, p)
                if spec is not None and spec.group not in seen:
                    seen[spec.group] = p.device
        for pg, dev in seen.items():
            dist.all_reduce(self._found_inf[dev], op=dist.ReduceOp.MAX, group=pg)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one step; `closure` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._collect()
        if work:
            self.count_skipped_step(not self._step_work(work, None, new_step=True))
        return loss

    @torch.no_grad()
    def step_params(self, params: Sequence[torch.Tensor], *, new_step: bool, part: Hashable = None) -> bool:
        """Step only `params` (those with a gradient), through the same path, checks and non-finite policy as step().

        For stepping a model part by part within one optimizer step (apollo_fast.optim.in_backward). The
        parameters' gradients are checked like step()'s and the part changes nothing when one is inf/NaN:
        nonfinite='raise' raises NonFiniteGradientError, 'skip' returns False. new_step: True for the first
        part of an optimizer step (with capturable=True a non-finite part raises the device flag, and every
        later part of the same optimizer step then skips on the device). part: a key under which the Triton
        backend keeps this part's launch tables between steps. The caller counts the optimizer step's skip
        once, with count_skipped_step(), after its last part.
        """
        work = self._collect(params)
        return self._step_work(work, part, new_step=new_step) if work else True

    def count_skipped_step(self, skipped: bool) -> None:
        """End of an optimizer step: count it in skipped_steps when it was skipped on the host, and with
        capturable=True and nonfinite='skip' add the device flags to skipped_steps_device."""
        self.skipped_steps += int(skipped)
        if self.capturable and self.nonfinite == "skip":
            for dev, found in self._found_inf.items():
                if dev not in self.skipped_steps_device:
                    self.skipped_steps_device[dev] = torch.zeros((), dtype=torch.int64, device=dev)
                self.skipped_steps_device[dev].add_(found)

    def _step_work(self, work: list, part: Hashable, *, new_step: bool) -> bool:
        """Step the collected parameters; False when skipped for a non-finite gradient (nothing changed)."""
        if self._backend_impl == "triton":
            return self._step_triton(work, part, new_step)
        if not self._grads_finite(work):
            return False
        for _, group, entries in work:
            ap, aw = self._lists(group, entries, [])
            hyper = Hyper.from_group(group, self.seed)
            apollo_reference(ap, hyper, self._proj_cache)
            adamw_reference(aw, hyper)
        return True

    def _step_triton(self, work: list, part: Hashable, new_step: bool) -> bool:
        """Pass A and the AdamW checks for every group, the non-finite decision, then the updates."""
        for dev in {p.device for _, _, entries in work for _, p in entries}:
            if dev not in self._found_inf:
                self._found_inf[dev] = torch.zeros((), dtype=torch.int32, device=dev)
        cap = self.capturable
        if new_step or not cap:  # capturable: the flag stays raised for the later parts of the step
            for found in self._found_inf.values():
                found.zero_()
        planned, undo = [], []
        for gi, group, entries in work:
            ap, aw = self._lists(group, entries, undo)
            hyper = Hyper.from_group(group, self.seed)
            launches = self._launches.get((gi, part))
            if launches is None:
                launches = self._launches[gi, part] = FusedLaunches(self._poison_scratch)
            fused_apollo_project(ap, hyper, self._found_inf, launches, capturable=cap)
            fused_adamw_check(aw, hyper, self._found_inf, launches, capturable=cap)
            planned.append((ap, aw, hyper, launches))
        self._agree_found(work)
        if not cap and any(bool(f.item()) for f in self._found_inf.values()):  # the step's one host sync
            for state, entries in undo:
                state.pop("proj", None)
                state.update(entries)
            self._grads_finite(work)  # raises with the parameter names under nonfinite='raise'
            return False
        skip = cap and self.nonfinite == "skip"
        for ap, aw, hyper, launches in planned:
            fused_apollo_update(ap, hyper, self._found_inf, launches, capturable=cap, skip_on_found=skip)
            fused_adamw(aw, hyper, self._found_inf, launches, capturable=cap, skip_on_found=skip)
        if skip:  # a skipped step is not counted: take back the device step counters' increment
            all_steps = [st for ap, aw, _, _ in planned for st in ap.steps + aw.steps]
            for dev, found in self._found_inf.items():
                torch._foreach_add_([st for st in all_steps if st.device == dev], found.float(), alpha=-1.0)
        return True


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t
