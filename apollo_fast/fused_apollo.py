"""The Triton backend of `APOLLO`: groups the step's tensors, builds launch tables, launches.

Per step, for every launch class (device, param group, dtypes, orientation, rank block) of APOLLO
matrices: Philox P~ -> pass A (R, ||G_k||^2, found flag); for every AdamW class: the found-flag
check. Then, non-capturable: one host sync on the flag (raise or skip). Capturable: no sync; with
nonfinite='skip' every later kernel reads the flag and leaves everything untouched. Then stage B
(moments, scale factors, limiter) and pass C per APOLLO class, and one AdamW launch per class.
Options are validated by `APOLLO`; this module only dispatches.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .optim import APOLLO

__all__ = ["FusedApollo", "triton_usable", "DOT_PRECISION_ENV"]

DOT_PRECISION_ENV = "APOLLO_FAST_DOT_PRECISION"  # 'tf32' (default), 'tf32x3' or 'ieee' for fp32 GEMMs


def triton_usable(device: torch.device) -> bool:
    """True when Triton can run kernels on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _to_device(rows: list[list[int]] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host table -> device without a host sync (pinned staging, non-blocking copy)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _tile_map(tiles: list[int], device: torch.device) -> torch.Tensor:
    """int32 tile -> row map for a launch whose row i owns tiles[i] consecutive programs."""
    rows = torch.repeat_interleave(torch.arange(len(tiles), dtype=torch.int32), torch.tensor(tiles))
    return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows


def _starts(tiles: list[int]) -> list[int]:
    """First program of each row: exclusive prefix sums of `tiles`."""
    return [0, *itertools.accumulate(tiles)][:-1]


@dataclass
class _Class:
    """One launch class: the tensors of one group that share dtypes, orientation and rank block."""

    group: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


@dataclass
class _Cached:
    """Device tables and scratch of one class, kept while their host contents stay the same."""

    rows: list[list[int]] | None = None
    meta: torch.Tensor | None = None
    layout: tuple | None = None
    maps: tuple[torch.Tensor, ...] = ()
    scratch: tuple[torch.Tensor, ...] = ()


class FusedApollo:
    """Runs `APOLLO.step` with the Triton kernels; holds launch tables and scratch, not state."""

    def __init__(self, opt: APOLLO) -> None:
        self.opt = opt
        self.poison_scratch = False  # tests: NaN-fill every scratch buffer before the launches
        self._cache: dict[tuple, _Cached] = {}
        self._found: dict[torch.device, torch.Tensor] = {}
        self.skipped_device: dict[torch.device, torch.Tensor] = {}  # capturable 'skip': device counter
        self.dot_precision = os.environ.get(DOT_PRECISION_ENV, "tf32")
        if self.dot_precision not in ("tf32", "tf32x3", "ieee"):
            raise ValueError(f"{DOT_PRECISION_ENV} must be tf32, tf32x3 or ieee, got {self.dot_precision!r}")

    # -- grouping ---------------------------------------------------------------------------------

    def _classes(self, work: list[tuple[dict[str, Any], torch.Tensor, str]]) -> tuple[dict, dict]:
        opt = self.opt
        apollo: dict[tuple, _Class] = {}
        adamw: dict[tuple, _Class] = {}
        for group, p, name in work:
            if not p.is_contiguous():
                raise ValueError(f"backend='triton' needs contiguous parameters: {name} is not")
            gid = id(group)
            if opt._uses_apollo(group, p):
                r = opt._state_shape(group, p)[1]
                if opt.projection == "philox" and r * min(p.shape) >= 2**32:
                    raise ValueError(f"{name}: rank x min(m, n) must stay below 2**32 for the Philox projection")
                block_r = min(256, max(16, _next_pow2(r)))
                key = (p.device, gid, p.dtype, p.grad.dtype, p.shape[0] >= p.shape[1], block_r)
                cls = apollo.setdefault(key, _Class(group))
            else:
                key = (p.device, gid, p.dtype, p.grad.dtype)
                cls = adamw.setdefault(key, _Class(group))
            cls.params.append(p)
            cls.names.append(name)
        return apollo, adamw

    def _prepare_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """Lazy state as the reference lays it out; step on the device when capturable."""
        opt = self.opt
        fresh = "exp_avg" not in opt.state[p]
        state = opt._init_state(group, p)
        if opt.capturable and state["step"].device != p.device:
            if fresh:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            else:
                state["step"] = state["step"].to(p.device, non_blocking=True)
        elif not opt.capturable and state["step"].device.type != "cpu":
            state["step"] = state["step"].cpu()  # a state saved capturable, loaded here: one sync, once
        if opt._uses_apollo(group, p):
            for k in ("exp_avg", "exp_avg_sq"):
                if state[k].dtype != opt.state_dtype:
                    state[k] = state[k].to(opt.state_dtype)
        return state

    # -- the step ---------------------------------------------------------------------------------

    def step(self, work: list[tuple[dict[str, Any], torch.Tensor, str]]) -> None:
        """One optimizer step over `work` (the (group, param, name) triples APOLLO._collect made)."""
        from .kernels.adamw import nonfinite_check_group
        from .kernels.apollo_project import apollo_project_group
        from .kernels.philox import philox_projection_group

        opt = self.opt
        if not work:
            return
        grads = {p: (p.grad if p.grad.is_contiguous() else p.grad.contiguous()) for _, p, _ in work}
        for group, p, _ in work:
            self._prepare_state(group, p)
        apollo, adamw = self._classes(work)
        devices = {p.device for _, p, _ in work}
        for dev in devices:
            if dev not in self._found:
                self._found[dev] = torch.zeros((), dtype=torch.int32, device=dev)
            self._found[dev].zero_()
        if opt.capturable:
            steps = [opt.state[p]["step"] for _, p, _ in work]
            torch._foreach_add_(steps, 1.0)

        plans = []
        for key, cls in apollo.items():
            plan = self._apollo_plan(key, cls, grads)
            plans.append(plan)
            found = self._found[key[0]]
            if opt.projection == "philox":
                philox_projection_group(plan["meta"], plan["map_px"], cls.group["update_proj_gap"], opt.capturable)
            apollo_project_group(
                plan["meta"], plan["map_a"], plan["gg"], found,
                sign=plan["sign"], g_dtype=plan["g_tl"], tall=key[4], n_rchunk=plan["n_rchunk"],
                block_c=plan["block_c"], block_r=key[5], block_d=plan["block_d"],
                dot_precision=self.dot_precision,
            )  # fmt: skip
        aplans = []
        for key, cls in adamw.items():
            plan = self._adamw_plan(key, cls, grads)
            aplans.append(plan)
            nonfinite_check_group(plan["meta"], plan["map"], self._found[key[0]], plan["g_tl"])

        if not opt.capturable:
            if any(bool(f.item()) for f in self._found.values()):  # the step's one host sync
                opt._grads_finite(work)  # raises with the parameter names under nonfinite='raise'
                opt.skipped_steps += 1
                return
            torch._foreach_add_([opt.state[p]["step"] for _, p, _ in work], 1.0)
        self._finish(apollo, plans, adamw, aplans)
        if opt.capturable and opt.nonfinite == "skip":
            for dev in devices:
                found_f = self._found[dev].float()
                steps = [opt.state[p]["step"] for _, p, _ in work if p.device == dev]
                torch._foreach_add_(steps, found_f, alpha=-1.0)
                if dev not in self.skipped_device:
                    self.skipped_device[dev] = torch.zeros((), dtype=torch.int64, device=dev)
                self.skipped_device[dev].add_(self._found[dev])

    def _finish(self, apollo: dict, plans: list, adamw: dict, aplans: list) -> None:
        from .kernels.adamw import adamw_group
        from .kernels.apollo_update import apollo_moments_group, apollo_scale_group, apollo_update_group

        opt = self.opt
        skip = opt.capturable and opt.nonfinite == "skip"
        for (key, cls), plan in zip(apollo.items(), plans, strict=True):
            g = cls.group
            beta1, beta2 = g["betas"]
            found = self._found[key[0]]
            lr_t = self._lr_tensor(g, key[0], found)
            apollo_moments_group(
                plan["meta"], plan["map_a"], plan["nn"], plan["rr"], found,
                beta1=beta1, beta2=beta2, eps=g["eps"], m_dtype=_tl_dtype(opt.state_dtype),
                skip_on_found=skip, n_rchunk=plan["n_rchunk"], block_c=plan["block_c"], block_r=key[5],
            )  # fmt: skip
            apollo_scale_group(
                plan["meta"], plan["nn"], plan["rr"], plan["gg"], found, lr_t,
                alpha=g["alpha"], beta1=beta1, beta2=beta2, gamma=g["norm_growth_limit"], sign=plan["sign"],
                capturable=opt.capturable, skip_on_found=skip, channel=g["scale_type"] == "channel",
            )  # fmt: skip
            apollo_update_group(
                plan["meta"], plan["map_c"], plan["nn"], found, lr_t,
                decay=plan["decay"], weight_decay=g["weight_decay"], w_dtype=plan["w_tl"], g_dtype=plan["g_tl"],
                tall=key[4], capturable=opt.capturable, skip_on_found=skip,
                block_m=plan["block_m"], block_n=plan["block_n"],
            )  # fmt: skip
        for (key, cls), plan in zip(adamw.items(), aplans, strict=True):
            g = cls.group
            beta1, beta2 = g["betas"]
            found = self._found[key[0]]
            adamw_group(
                plan["meta"], plan["map"], found, self._lr_tensor(g, key[0], found),
                lr=plan["lr"], beta1=beta1, beta2=beta2, eps=g["eps"], weight_decay=g["weight_decay"],
                sign=-1.0 if g["maximize"] else 1.0, p_dtype=plan["p_tl"], g_dtype=plan["g_tl"],
                capturable=opt.capturable, skip_on_found=skip,
            )  # fmt: skip

    def _lr_tensor(self, group: dict[str, Any], device: torch.device, dummy: torch.Tensor) -> torch.Tensor:
        """lr as a device tensor (capturable), else a placeholder pointer the kernels never read."""
        if not self.opt.capturable:
            return dummy
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            return lr
        return torch.full((), float(lr), dtype=torch.float32, device=device)

    # -- tables -----------------------------------------------------------------------------------

    def _apollo_plan(self, key: tuple, cls: _Class, grads: dict) -> dict[str, Any]:
        from .kernels import tables as T

        opt = self.opt
        group = cls.group
        dev, block_r = key[0], key[5]
        is16 = key[3] in (torch.float16, torch.bfloat16)
        block_c = 64 if block_r >= 128 else 128
        block_d = 64 if is16 else 32
        block_m, block_n = 16, 256
        shapes = [tuple(p.shape) for p in cls.params]
        ranks = [opt.state[p]["exp_avg"].shape[1] for p in cls.params]
        n_rchunk = max(math.ceil(r / block_r) for r in ranks)
        layout = (tuple(shapes), tuple(ranks), block_c, block_r, block_m, block_n, opt.projection)
        cache = self._cache.setdefault(("apollo",) + key, _Cached())
        if cache.layout != layout:
            tiles_px, tiles_a, tiles_c = [], [], []
            c_off = r_off = p_off = 0
            offsets = []
            for (m, n), r in zip(shapes, ranks, strict=True):
                C, d = max(m, n), min(m, n)
                offsets.append((c_off, r_off, p_off))
                tiles_px.append(math.ceil(r * d / 1024))
                tiles_a.append(math.ceil(C / block_c))
                tiles_c.append(math.ceil(m / block_m) * math.ceil(n / block_n))
                c_off += C
                r_off += C * r
                p_off += r * d if opt.projection == "philox" else 0
            maps = tuple(_tile_map(t, dev) for t in (tiles_px, tiles_a, tiles_c))
            starts = [_starts(t) for t in (tiles_px, tiles_a, tiles_c)]
            ws = torch.empty((3, c_off), dtype=torch.float32, device=dev)
            r_buf = torch.empty(r_off, dtype=torch.float32, device=dev)
            p_buf = torch.empty(p_off, dtype=torch.float32, device=dev)
            cache.layout, cache.maps, cache.scratch = layout, maps, (ws, r_buf, p_buf, offsets, starts)
            cache.rows = None
        ws, r_buf, p_buf, offsets, starts = cache.scratch
        if self.poison_scratch:
            for t in (ws, r_buf, p_buf):
                t.fill_(float("nan"))
        if n_rchunk > 1:
            ws[:2].zero_()  # nn and rr are accumulated with atomics over rank chunks

        lr = None if opt.capturable else float(group["lr"])
        beta1, beta2 = group["betas"]
        rows = []
        for i, p in enumerate(cls.params):
            state = opt.state[p]
            m, n = p.shape
            C, d, r = max(m, n), min(m, n), ranks[i]
            c_off, r_off, p_off = offsets[i]
            row = [0] * T.AP_WIDTH
            row[T.AP_G] = grads[p].data_ptr()
            row[T.AP_W] = p.data_ptr()
            row[T.AP_M] = state["exp_avg"].data_ptr()
            row[T.AP_V] = state["exp_avg_sq"].data_ptr()
            row[T.AP_R] = r_buf.data_ptr() + 4 * r_off
            row[T.AP_WS] = c_off
            row[T.AP_C], row[T.AP_D], row[T.AP_RANK] = C, d, r
            row[T.AP_KEY_LO] = opt._param_index[p] - 1
            row[T.AP_KEY_HI] = opt.seed
            row[T.AP_LIM] = state["limiter_norm"].data_ptr()
            row[T.AP_TILE_PX], row[T.AP_TILE_A], row[T.AP_TILE_C] = (s[i] for s in starts)
            if opt.capturable:
                row[T.AP_STEP] = state["step"].data_ptr()
            else:
                t = int(state["step"].item()) + 1  # a CPU tensor: no device sync
                row[T.AP_REFRESH] = (t - 1) // group["update_proj_gap"]
                row[T.AP_FIRST] = int(t == 1)
                eta = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                row[T.AP_ETA] = _f64_bits(eta * group["alpha"])
            if opt.projection == "philox":
                row[T.AP_P] = p_buf.data_ptr() + 4 * p_off
            else:
                t = int(state["step"].item()) + 1
                row[T.AP_P] = opt._projection(group, p, state, t).data_ptr()
            rows.append(row)
        if cache.rows != rows:
            cache.rows, cache.meta = rows, _to_device(rows, torch.int64, dev)
        return dict(
            meta=cache.meta, map_px=cache.maps[0], map_a=cache.maps[1], map_c=cache.maps[2],
            nn=ws[0], rr=ws[1], gg=ws[2], n_rchunk=n_rchunk, block_c=block_c, block_d=block_d,
            block_m=block_m, block_n=block_n, sign=-1.0 if group["maximize"] else 1.0,
            decay=1.0 if lr is None else 1.0 - lr * group["weight_decay"],
            g_tl=_tl_dtype(key[3]), w_tl=_tl_dtype(key[2]),
        )  # fmt: skip

    def _adamw_plan(self, key: tuple, cls: _Class, grads: dict) -> dict[str, Any]:
        from .kernels import tables as T
        from .kernels.adamw import ADAMW_BLOCK

        opt = self.opt
        group = cls.group
        dev = key[0]
        sizes = tuple(p.numel() for p in cls.params)
        cache = self._cache.setdefault(("adamw",) + key, _Cached())
        if cache.layout != sizes:
            tiles = [math.ceil(s / ADAMW_BLOCK) for s in sizes]
            cache.maps = (_tile_map(tiles, dev),)
            cache.scratch = (_starts(tiles),)
            cache.layout, cache.rows = sizes, None
        (starts,) = cache.scratch
        lr = None if opt.capturable else float(group["lr"])
        beta1, beta2 = group["betas"]
        rows = []
        for i, p in enumerate(cls.params):
            state = opt.state[p]
            row = [0] * T.AW_WIDTH
            row[T.AW_P], row[T.AW_G] = p.data_ptr(), grads[p].data_ptr()
            row[T.AW_M], row[T.AW_V] = state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr()
            row[T.AW_N], row[T.AW_TILE] = sizes[i], starts[i]
            if opt.capturable:
                row[T.AW_STEP] = state["step"].data_ptr()
            else:
                t = int(state["step"].item()) + 1
                row[T.AW_STEP_SIZE] = _f64_bits(lr / (1.0 - beta1**t))
                row[T.AW_BC2] = _f64_bits(math.sqrt(1.0 - beta2**t))
            rows.append(row)
        if cache.rows != rows:
            cache.rows, cache.meta = rows, _to_device(rows, torch.int64, dev)
        return dict(
            meta=cache.meta, map=cache.maps[0], lr=0.0 if lr is None else lr,
            p_tl=_tl_dtype(key[2]), g_tl=_tl_dtype(key[3]),
        )  # fmt: skip


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if dtype not in table:
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16 tensors, not {dtype}")
    return table[dtype]
