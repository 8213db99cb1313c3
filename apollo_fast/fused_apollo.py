"""The Triton backend of `APOLLO`: groups the step's tensors, builds launch tables, launches.

Per step, for every launch class (device, param group, dtypes, orientation, rank block) of APOLLO
matrices: Philox P~ (regenerated on the device only when its refresh index changed) -> pass A (R,
||G_k||^2, found flag); for every AdamW class: the found-flag
check. Then, non-capturable: one host sync on the flag (raise or skip). Capturable: no sync; with
nonfinite='skip' every later kernel reads the flag and leaves everything untouched. Then stage B
(moments, scale factors, limiter) and pass C per APOLLO class, and one AdamW launch per class.
Options are validated by `APOLLO`; this module only dispatches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .optim import APOLLO

__all__ = ["FusedApollo", "triton_usable", "DOT_PRECISION_ENV"]

DOT_PRECISION_ENV = "APOLLO_FAST_DOT_PRECISION"  # 'tf32' (default), 'tf32x3' or 'ieee' for fp32 GEMMs

# Pass A tiles: a 128 x 128 fp32 accumulator per program; rank 256 takes two rank chunks, which
# run side by side and re-read their G tile from L2. Untuned (no GPU yet): see benches/NOTES-apollo.md.
_BLOCK_C = 128
_MAX_BLOCK_R = 128


def triton_usable(device: torch.device) -> bool:
    """True when Triton can run kernels on tensors of `device` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _to_device(rows: list[list[int]] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host table -> device without a host sync (pinned staging, non-blocking copy)."""
    t = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on `device` (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tile_map(tiles: list[int], device: torch.device) -> torch.Tensor:
    """int32 tile -> row map for a launch whose row i owns tiles[i] consecutive programs."""
    rows = torch.repeat_interleave(torch.arange(len(tiles), dtype=torch.int32), torch.tensor(tiles))
    return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows


def _starts(tiles: list[int]) -> list[int]:
    """First program of each row: exclusive prefix sums of `tiles`."""
    return [0, *itertools.accumulate(tiles)][:-1]


@dataclass
class _ApolloLaunch:
    """One APOLLO launch class: matrices of one group with the same dtypes, orientation and rank block."""

    key: tuple
    group: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    meta: torch.Tensor | None = None
    rows: list[list[int]] = field(default_factory=list)
    maps: tuple[torch.Tensor, ...] = ()
    ws: torch.Tensor | None = None  # 3 x sum(C): ||N_k||^2 (then coef_k), ||R_k||^2, ||G_k||^2
    r_buf: torch.Tensor | None = None  # sum(C x r) fp32: R
    p_buf: torch.Tensor | None = None  # sum(r x d) fp32: P~ ('philox'), kept between refreshes
    p_refresh: torch.Tensor | None = None  # int64 per Philox tile: 1 + refresh index its P~ holds
    n_rchunk: int = 1
    block_c: int = 64
    block_d: int = 32
    block_m: int = 16
    block_n: int = 256


@dataclass
class _AdamwLaunch:
    """One AdamW launch class: the non-matrix tensors of one group with the same dtypes."""

    key: tuple
    group: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    meta: torch.Tensor | None = None
    rows: list[list[int]] = field(default_factory=list)
    tile_map: torch.Tensor | None = None


class FusedApollo:
    """Runs `APOLLO.step` with the Triton kernels; holds launch tables and scratch, not state.

    Launch classes, meta tables, tile maps and scratch are rebuilt only when the step's tensors
    change (a new parameter, a new gradient buffer, loaded state); otherwise a step costs the host a
    signature check, one small per-step table per class (non-capturable) and the launches.
    """

    def __init__(self, opt: APOLLO) -> None:
        self.opt = opt
        self.poison_scratch = False  # tests: NaN-fill every scratch buffer before the launches
        self.skipped_device: dict[torch.device, torch.Tensor] = {}  # capturable 'skip': device counter
        self.dot_precision = os.environ.get(DOT_PRECISION_ENV, "tf32")
        if self.dot_precision not in ("tf32", "tf32x3", "ieee"):
            raise ValueError(f"{DOT_PRECISION_ENV} must be tf32, tf32x3 or ieee, got {self.dot_precision!r}")
        self._found: dict[torch.device, torch.Tensor] = {}
        self._sig: tuple | None = None
        self._grad_ptrs: list[int] = []
        self._apollo: list[_ApolloLaunch] = []
        self._adamw: list[_AdamwLaunch] = []
        self._host_t: dict[int, tuple[torch.Tensor, int]] = {}  # id(param) -> (its step tensor, steps taken)

    # -- layout -----------------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget the launch tables (the state was replaced); the next step rebuilds them."""
        self._sig = None
        self._host_t.clear()

    def _signature(self, work: list) -> tuple:
        """What the launch classes, scratch and tables depend on, gradient buffers aside."""
        st = self.opt.state
        return tuple((id(g), id(p), p.data_ptr(), id(st[p].get("exp_avg")), id(st[p].get("step"))) for g, p, _ in work)

    def _patch_grads(self, grads: dict) -> None:
        """New gradient buffers (zero_grad(set_to_none=True)): only the G addresses change."""
        from .kernels import tables as T

        for la in self._apollo:
            for row, p in zip(la.rows, la.params, strict=True):
                row[T.AP_G] = grads[p].data_ptr()
            la.meta = _to_device(la.rows, torch.int64, la.key[0])
        for lw in self._adamw:
            for row, p in zip(lw.rows, lw.params, strict=True):
                row[T.AW_G] = grads[p].data_ptr()
            lw.meta = _to_device(lw.rows, torch.int64, lw.key[0])

    def _prepare_state(self, group: dict[str, Any], p: torch.Tensor) -> None:
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

    def _build(self, work: list, grads: dict) -> None:
        """Launch classes, tile maps, scratch and meta tables for the tensors of `work`."""
        opt = self.opt
        apollo: dict[tuple, _ApolloLaunch] = {}
        adamw: dict[tuple, _AdamwLaunch] = {}
        for group, p, i in work:
            if not p.is_contiguous():
                raise ValueError(f"backend='triton' needs contiguous parameters: {opt._name(group, i, p)} is not")
            for dt in (p.dtype, p.grad.dtype):
                _tl_dtype(dt)  # raises TypeError naming an unsupported dtype
            if opt._uses_apollo(group, p):
                r = opt.state[p]["exp_avg"].shape[1]
                if opt.projection == "philox" and r * min(p.shape) >= 2**32:
                    raise ValueError(
                        f"{opt._name(group, i, p)}: rank x min(m, n) must stay below 2**32 for the Philox projection"
                    )
                block_r = min(_MAX_BLOCK_R, max(16, _next_pow2(r)))
                key = (p.device, id(group), p.dtype, p.grad.dtype, p.shape[0] >= p.shape[1], block_r)
                apollo.setdefault(key, _ApolloLaunch(key, group)).params.append(p)
            else:
                key = (p.device, id(group), p.dtype, p.grad.dtype)
                adamw.setdefault(key, _AdamwLaunch(key, group)).params.append(p)
        self._apollo = list(apollo.values())
        self._adamw = list(adamw.values())
        for la in self._apollo:
            self._build_apollo(la, grads)
        for lw in self._adamw:
            self._build_adamw(lw, grads)
        for dev in {p.device for _, p, _ in work}:
            if dev not in self._found:
                self._found[dev] = torch.zeros((), dtype=torch.int32, device=dev)

    def _build_apollo(self, la: _ApolloLaunch, grads: dict) -> None:
        from .kernels import tables as T

        opt = self.opt
        dev, g_dtype, block_r = la.key[0], la.key[3], la.key[5]
        la.block_c = _BLOCK_C
        la.block_d = 64 if g_dtype in (torch.float16, torch.bfloat16) else 32
        ranks = [opt.state[p]["exp_avg"].shape[1] for p in la.params]
        la.n_rchunk = max(math.ceil(r / block_r) for r in ranks)
        tiles_px, tiles_a, tiles_c, offsets = [], [], [], []
        c_off = r_off = p_off = 0
        for p, r in zip(la.params, ranks, strict=True):
            m, n = p.shape
            C, d = max(m, n), min(m, n)
            offsets.append((c_off, r_off, p_off))
            tiles_px.append(math.ceil(r * d / 1024))
            tiles_a.append(math.ceil(C / la.block_c))
            tiles_c.append(math.ceil(m / la.block_m) * math.ceil(n / la.block_n))
            c_off, r_off = c_off + C, r_off + C * r
            p_off += r * d if opt.projection == "philox" else 0
        la.maps = tuple(_tile_map(t, dev) for t in (tiles_px, tiles_a, tiles_c))
        starts = [_starts(t) for t in (tiles_px, tiles_a, tiles_c)]
        la.ws = torch.empty((3, c_off), dtype=torch.float32, device=dev)
        la.r_buf = torch.empty(r_off, dtype=torch.float32, device=dev)
        la.p_buf = torch.empty(p_off, dtype=torch.float32, device=dev)
        la.p_refresh = torch.zeros(sum(tiles_px), dtype=torch.int64, device=dev)
        if self.poison_scratch:
            la.p_buf.fill_(float("nan"))
        la.rows = []
        for i, p in enumerate(la.params):
            state = opt.state[p]
            m, n = p.shape
            c_off, r_off, p_off = offsets[i]
            row = [0] * T.AP_WIDTH
            row[T.AP_G], row[T.AP_W] = grads[p].data_ptr(), p.data_ptr()
            row[T.AP_M], row[T.AP_V] = state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr()
            row[T.AP_P] = la.p_buf.data_ptr() + 4 * p_off  # 'official': set per step in _official_p
            row[T.AP_R] = la.r_buf.data_ptr() + 4 * r_off
            row[T.AP_WS] = c_off
            row[T.AP_C], row[T.AP_D], row[T.AP_RANK] = max(m, n), min(m, n), ranks[i]
            row[T.AP_KEY_LO], row[T.AP_KEY_HI] = opt._param_index[p] - 1, opt.seed
            row[T.AP_STEP] = state["step"].data_ptr() if opt.capturable else 0
            row[T.AP_LIM] = state["limiter_norm"].data_ptr()
            row[T.AP_TILE_PX], row[T.AP_TILE_A], row[T.AP_TILE_C] = (s[i] for s in starts)
            la.rows.append(row)
        la.meta = _to_device(la.rows, torch.int64, dev)

    def _build_adamw(self, lw: _AdamwLaunch, grads: dict) -> None:
        from .kernels import tables as T
        from .kernels.adamw import ADAMW_BLOCK

        opt = self.opt
        tiles = [math.ceil(p.numel() / ADAMW_BLOCK) for p in lw.params]
        lw.tile_map = _tile_map(tiles, lw.key[0])
        rows = []
        for p, start in zip(lw.params, _starts(tiles), strict=True):
            state = opt.state[p]
            row = [0] * T.AW_WIDTH
            row[T.AW_P], row[T.AW_G] = p.data_ptr(), grads[p].data_ptr()
            row[T.AW_M], row[T.AW_V] = state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr()
            row[T.AW_N], row[T.AW_TILE] = p.numel(), start
            row[T.AW_STEP] = state["step"].data_ptr() if opt.capturable else 0
            rows.append(row)
        lw.rows = rows
        lw.meta = _to_device(rows, torch.int64, lw.key[0])

    def _host_steps(self, params: list[torch.Tensor]) -> list[int]:
        """Steps taken so far by each parameter (non-capturable: the step tensors are on the CPU)."""
        out = []
        for p in params:
            st = self.opt.state[p]["step"]
            ent = self._host_t.get(id(p))
            if ent is None or ent[0] is not st:
                ent = (st, int(st.item()))  # a CPU tensor: no device sync
                self._host_t[id(p)] = ent
            out.append(ent[1])
        return out

    def _official_p(self, la: _ApolloLaunch, ts: list[int], saved: list) -> None:
        """projection='official': point the rows at the stored P~, redrawn on the host at refreshes.

        The (proj, proj_seed) entries are saved first, so that a step skipped or refused for a
        non-finite gradient can put them back (nothing may change on such a step).
        """
        from .kernels import tables as T

        opt = self.opt
        changed = False
        for row, p, t in zip(la.rows, la.params, ts, strict=True):
            state = opt.state[p]
            saved.append((state, {k: state[k] for k in ("proj", "proj_seed") if k in state}))
            ptr = opt._projection(la.group, p, state, t + 1).data_ptr()
            if row[T.AP_P] != ptr:
                row[T.AP_P], changed = ptr, True
        if changed:
            la.meta = _to_device(la.rows, torch.int64, la.key[0])

    # -- the step ---------------------------------------------------------------------------------

    def step(self, work: list[tuple[dict[str, Any], torch.Tensor, int]]) -> None:
        """One optimizer step over `work` (the (group, param, index in group) triples APOLLO._collect made)."""
        from .kernels.adamw import nonfinite_check_group
        from .kernels.apollo_project import apollo_project_group
        from .kernels.philox import philox_projection_group

        opt = self.opt
        if not work:
            return
        grads = {p: (p.grad if p.grad.is_contiguous() else p.grad.contiguous()) for _, p, _ in work}
        grad_ptrs = [grads[p].data_ptr() for _, p, _ in work]
        sig = self._signature(work)
        if sig != self._sig:
            for group, p, _ in work:
                self._prepare_state(group, p)
            self._build(work, grads)
            self._sig = self._signature(work)
        elif grad_ptrs != self._grad_ptrs:
            self._patch_grads(grads)
        self._grad_ptrs = grad_ptrs
        for found in self._found.values():
            found.zero_()
        if opt.capturable:
            torch._foreach_add_([opt.state[p]["step"] for _, p, _ in work], 1.0)

        ap_dyn, aw_dyn, saved_official = [], [], []
        for la in self._apollo:
            group, found = la.group, self._found[la.key[0]]
            dyn = found  # placeholder pointer: capturable kernels read the device step instead
            if not opt.capturable:
                ts = self._host_steps(la.params)
                dyn = self._apollo_dyn(group, ts, la.key[0])
                if opt.projection == "official":
                    self._official_p(la, ts, saved_official)
            ap_dyn.append(dyn)
            if self.poison_scratch:  # P~ is poisoned once, when allocated: it is kept between refreshes
                la.ws.fill_(float("nan"))
                la.r_buf.fill_(float("nan"))
            if la.n_rchunk > 1:
                la.ws[:2].zero_()  # nn and rr are accumulated with atomics over rank chunks
            with _on(la.key[0]):
                if opt.projection == "philox":
                    philox_projection_group(
                        la.meta, dyn, la.maps[0], la.p_refresh, group["update_proj_gap"], opt.capturable
                    )
                apollo_project_group(
                    la.meta, la.maps[1], la.ws[2], found,
                    sign=-1.0 if group["maximize"] else 1.0, g_dtype=_tl_dtype(la.key[3]), tall=la.key[4],
                    n_rchunk=la.n_rchunk, block_c=la.block_c, block_r=la.key[5], block_d=la.block_d,
                    dot_precision=self.dot_precision,
                )  # fmt: skip
        for lw in self._adamw:
            found = self._found[lw.key[0]]
            if opt.capturable:
                aw_dyn.append(found)
            else:
                aw_dyn.append(self._adamw_dyn(lw.group, self._host_steps(lw.params), lw.key[0]))
            with _on(lw.key[0]):
                nonfinite_check_group(lw.meta, lw.tile_map, found, _tl_dtype(lw.key[3]))

        if not opt.capturable:
            if any(bool(f.item()) for f in self._found.values()):  # the step's one host sync
                for state, entries in saved_official:
                    state.pop("proj", None)
                    state.update(entries)
                opt._grads_finite(work)  # raises with the parameter names under nonfinite='raise'
                opt.skipped_steps += 1
                return
            torch._foreach_add_([opt.state[p]["step"] for _, p, _ in work], 1.0)
            for _, p, _ in work:
                st, t = self._host_t[id(p)]
                self._host_t[id(p)] = (st, t + 1)
        self._finish(ap_dyn, aw_dyn)
        if opt.capturable and opt.nonfinite == "skip":
            for dev, found in self._found.items():
                steps = [opt.state[p]["step"] for _, p, _ in work if p.device == dev]
                torch._foreach_add_(steps, found.float(), alpha=-1.0)
                if dev not in self.skipped_device:
                    self.skipped_device[dev] = torch.zeros((), dtype=torch.int64, device=dev)
                self.skipped_device[dev].add_(found)

    def _apollo_dyn(self, group: dict[str, Any], ts: list[int], dev: torch.device) -> torch.Tensor:
        """Per-matrix [eta_t * alpha, refresh index, first step] for this step (t = steps taken + 1)."""
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        by_t: dict[int, list[float]] = {}
        for t in set(ts):
            t1 = t + 1
            eta = lr * math.sqrt(1.0 - beta2**t1) / (1.0 - beta1**t1)
            by_t[t] = [eta * group["alpha"], float((t1 - 1) // group["update_proj_gap"]), float(t1 == 1)]
        return _to_device([by_t[t] for t in ts], torch.float64, dev)

    def _adamw_dyn(self, group: dict[str, Any], ts: list[int], dev: torch.device) -> torch.Tensor:
        """Per-tensor [lr / (1 - b1^t), sqrt(1 - b2^t)] for this step."""
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        by_t = {t: [lr / (1.0 - beta1 ** (t + 1)), math.sqrt(1.0 - beta2 ** (t + 1))] for t in set(ts)}
        return _to_device([by_t[t] for t in ts], torch.float64, dev)

    def _finish(self, ap_dyn: list[torch.Tensor], aw_dyn: list[torch.Tensor]) -> None:
        from .kernels.adamw import adamw_group
        from .kernels.apollo_update import apollo_moments_group, apollo_scale_group, apollo_update_group

        opt = self.opt
        skip = opt.capturable and opt.nonfinite == "skip"
        for la, dyn in zip(self._apollo, ap_dyn, strict=True):
            g = la.group
            beta1, beta2 = g["betas"]
            found = self._found[la.key[0]]
            lr_t = self._lr_tensor(g, la.key[0], found)
            nn, rr, gg = la.ws[0], la.ws[1], la.ws[2]
            with _on(la.key[0]):
                apollo_moments_group(
                    la.meta, la.maps[1], nn, rr, found,
                    beta1=beta1, beta2=beta2, eps=g["eps"], m_dtype=_tl_dtype(opt.state_dtype),
                    skip_on_found=skip, n_rchunk=la.n_rchunk, block_c=la.block_c, block_r=la.key[5],
                )  # fmt: skip
                apollo_scale_group(
                    la.meta, dyn, nn, rr, gg, found, lr_t,
                    alpha=g["alpha"], beta1=beta1, beta2=beta2, gamma=g["norm_growth_limit"],
                    sign=-1.0 if g["maximize"] else 1.0,
                    capturable=opt.capturable, skip_on_found=skip, channel=g["scale_type"] == "channel",
                )  # fmt: skip
                apollo_update_group(
                    la.meta, la.maps[2], nn, found, lr_t,
                    decay=1.0 if opt.capturable else 1.0 - float(g["lr"]) * g["weight_decay"],
                    weight_decay=g["weight_decay"], w_dtype=_tl_dtype(la.key[2]), g_dtype=_tl_dtype(la.key[3]),
                    tall=la.key[4], capturable=opt.capturable, skip_on_found=skip,
                    block_m=la.block_m, block_n=la.block_n,
                )  # fmt: skip
        for lw, dyn in zip(self._adamw, aw_dyn, strict=True):
            g = lw.group
            beta1, beta2 = g["betas"]
            found = self._found[lw.key[0]]
            with _on(lw.key[0]):
                adamw_group(
                    lw.meta, dyn, lw.tile_map, found, self._lr_tensor(g, lw.key[0], found),
                    lr=0.0 if opt.capturable else float(g["lr"]), beta1=beta1, beta2=beta2, eps=g["eps"],
                    weight_decay=g["weight_decay"], sign=-1.0 if g["maximize"] else 1.0,
                    p_dtype=_tl_dtype(lw.key[2]), g_dtype=_tl_dtype(lw.key[3]),
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


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if dtype not in table:
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16 tensors, not {dtype}")
    return table[dtype]
