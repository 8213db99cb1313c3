"""The Triton backend of the APOLLO step: launch classes, cached launch tables and scratch, and the launches.

Per param group and launch class (device, dtypes, orientation, rank block; never one launch per
parameter), a step is two phases, so that nothing changes before every gradient is known to be finite:

    fused_apollo_project  Philox P~ (regenerated on the device only when its refresh index changed), then
                          pass A: R = Gc P~^T and the per-channel ||G_k||^2 in one read of G, into scratch;
                          raises the found-inf flag for a non-finite gradient
    fused_adamw_check     raises the flag for the AdamW tensors
    -- the caller decides on the flag: one host sync, or none when capturable (the kernels then skip) --
    fused_apollo_update   stage B (moments, scale factors, limiter on r-sized data), pass C (the update)
    fused_adamw           AdamW, one multi-tensor launch per class

The functions take the lists of optim/lists.py and know nothing of the optimizer; a `FusedLaunches`
per param group keeps what can be reused between steps (tables, tile maps, scratch, the regenerated P~).

Sharded matrices (FSDP2 DTensors; the lists hold their local shards and ShardSpecs, the math is optim/sharded.py's)
form launch classes of their own, by kind (shards along the channel side, or along the compressed side) and
process group, and the update phase runs the collectives between its launches, each ONE call per process group
and param group whatever the number of matrices: pass A of compressed-side shards writes [R | ||G_k||^2] straight
into the reduce-scatter's send buffer; after it, stage B works on each rank's slice of channels; the scale kernel
runs in two parts around the all-reduce of 3 floats per matrix; the channel scales of compressed-side shards are
all-gathered for pass C. Collectives are enqueued like kernels (NCCL: on the device, no host sync; capturable).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..reference.apollo import apollo_step_size, bias_corrections
from .lists import AdamwLists, ApolloLists, Hyper, refresh_index
from .placement import ShardSpec, chunk_range
from .sharded import all_gather_single, reduce_scatter_single

__all__ = [
    "DOT_PRECISION_ENV",
    "FusedLaunches",
    "fused_adamw",
    "fused_adamw_check",
    "fused_apollo_project",
    "fused_apollo_update",
    "tl_dtype",
]

DOT_PRECISION_ENV = "APOLLO_FAST_DOT_PRECISION"  # 'tf32' (default), 'tf32x3' or 'ieee' for fp32 GEMMs

# Pass A tiles: a 128 x 128 fp32 accumulator per program; rank 256 takes two rank chunks, which
# run side by side and re-read their G tile from L2. Untuned (no GPU yet): see benches/NOTES-apollo.md.
_BLOCK_C = 128
_MAX_BLOCK_R = 128


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a float32/float16/bfloat16 tensor; TypeError otherwise."""
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    if dtype not in table:
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16 tensors, not {dtype}")
    return table[dtype]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _to_device(rows: list[list[int]] | list[list[float]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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


# LaunchKey.shard: how the matrices of an APOLLO launch class are sharded
PLAIN, CHANNEL_SHARDS, SPREAD_SHARDS = 0, 1, 2  # not; along the channel side; along the compressed side


class LaunchKey(NamedTuple):
    """What tensors of one launch share (block_r: the rank block of APOLLO matrices, 0 for AdamW tensors; tall:
    the orientation of the whole matrix; group: the process group of sharded ones; quads: AdamW tensors whose
    stochastic rounding bits come in whole groups of 4)."""

    device: torch.device
    w_dtype: torch.dtype
    g_dtype: torch.dtype
    tall: bool = True
    block_r: int = 0
    shard: int = PLAIN
    group: object = None
    quads: bool = True


@dataclass
class _ShardComm:
    """The collectives of one param group's sharded matrices on one process group, and their buffers.

    Per step: one reduce-scatter (compressed-side shards: rows [R_k | ||G_k||^2] of r + 1 floats, piece =
    ceil(C / world) channels per rank and matrix, `rs_block` floats per rank), one all-reduce of `sums` (3 floats
    per sharded matrix) and one all-gather of the compressed-side shards' channel coefficients (`gather_block`
    floats per rank: piece per matrix; row 0 of `ws`, the stage-B channel vectors of those matrices)."""

    group: object
    world: int
    rank: int
    device: torch.device
    n_sums: int = 0
    rs_block: int = 0
    gather_block: int = 0
    atomics: bool = False  # a compressed-side class accumulates ||N_k||^2, ||R_k||^2 over rank chunks
    sums: torch.Tensor | None = None
    rs_send: torch.Tensor | None = None
    rs_recv: torch.Tensor | None = None
    ws: torch.Tensor | None = None
    gathered: torch.Tensor | None = None

    def allocate(self) -> None:
        empty = lambda *shape: torch.empty(shape, dtype=torch.float32, device=self.device)
        self.sums = empty(self.n_sums, 3)
        self.rs_send, self.rs_recv = empty(self.world * self.rs_block), empty(self.rs_block)
        self.ws, self.gathered = empty(3, self.gather_block), empty(self.world * self.gather_block)

    def poison(self) -> None:
        for buf in (self.sums, self.rs_send, self.rs_recv, self.ws, self.gathered):
            buf.fill_(float("nan"))


@dataclass
class _ApolloLaunch:
    """One APOLLO launch class: its matrices' positions in the group's lists, tables and scratch."""

    key: LaunchKey
    idx: list[int] = field(default_factory=list)
    meta: torch.Tensor | None = None
    rows: list[list[int]] = field(default_factory=list)
    maps: tuple[torch.Tensor, ...] = ()  # tile maps of the Philox, projection, update and moment launches
    comm: _ShardComm | None = None  # sharded matrices: their collectives
    ws: torch.Tensor | None = None  # 3 x sum(C): ||N_k||^2 (then coef_k), ||R_k||^2, ||G_k||^2
    r_buf: torch.Tensor | None = None  # sum(C x r) fp32: R
    p_buf: torch.Tensor | None = None  # sum(r x d) fp32: P~ ('philox'), kept between refreshes
    p_refresh: torch.Tensor | None = None  # int64 per Philox tile: 1 + refresh index its P~ holds
    dyn: torch.Tensor | None = None  # this step's per-matrix [eta_t * alpha, refresh, first, t] (non-capturable)
    n_rchunk: int = 1
    block_c: int = _BLOCK_C
    block_d: int = 32
    block_m: int = 16
    block_n: int = 256


@dataclass
class _AdamwLaunch:
    """One AdamW launch class: its tensors' positions in the group's lists and its table."""

    key: LaunchKey
    idx: list[int] = field(default_factory=list)
    meta: torch.Tensor | None = None
    rows: list[list[int]] = field(default_factory=list)
    tile_map: torch.Tensor | None = None
    dyn: torch.Tensor | None = None  # this step's per-tensor [lr / (1 - b1^t), sqrt(1 - b2^t), t] (non-capturable)


class FusedLaunches:
    """Launch classes, tables and scratch of one param group's Triton step, reused while its tensors stay.

    They are rebuilt only when the lists' tensors change (a new parameter or state); new gradient buffers
    (zero_grad(set_to_none=True)) only patch the G addresses. poison_scratch (tests) NaN-fills every
    scratch buffer before its launch, so an element a kernel does not write fails the comparison.
    """

    def __init__(self, poison_scratch: bool = False) -> None:
        self.poison_scratch = poison_scratch
        self.dot_precision = os.environ.get(DOT_PRECISION_ENV, "tf32")
        if self.dot_precision not in ("tf32", "tf32x3", "ieee"):
            raise ValueError(f"{DOT_PRECISION_ENV} must be tf32, tf32x3 or ieee, got {self.dot_precision!r}")
        self.apollo: list[_ApolloLaunch] = []
        self.adamw: list[_AdamwLaunch] = []
        self.comms: list[_ShardComm] = []  # one per process group of sharded APOLLO matrices
        self._sig: dict[str, tuple] = {}
        self._grad_ptrs: dict[str, list[int]] = {}
        # id(step tensor) -> (it, steps taken, its version): a step taken through other tables (another part of
        # the model in step-in-backward mode, or step() after it) bumps the version, and the count is re-read
        self._host_t: dict[int, tuple[torch.Tensor, int, int]] = {}

    def host_steps(self, steps: list[torch.Tensor]) -> list[int]:
        """Steps taken so far (non-capturable: CPU step tensors, read once and then mirrored here)."""
        out = []
        for st in steps:
            ent = self._host_t.get(id(st))
            if ent is None or ent[0] is not st or ent[2] != st._version:
                ent = self._host_t[id(st)] = (st, int(st.item()), st._version)  # a CPU tensor: no device sync
            out.append(ent[1])
        return out

    def count_steps(self, steps: list[torch.Tensor]) -> None:
        """The step was taken: steps += 1 in the tensors and the mirror."""
        torch._foreach_add_(steps, 1.0)
        for st in steps:
            held, t, _ = self._host_t[id(st)]
            self._host_t[id(st)] = (held, t + 1, st._version)

    def _stale(self, kind: str, sig: tuple, grads: list[torch.Tensor]) -> bool:
        """True when `kind`'s classes must be rebuilt; patches new gradient addresses otherwise."""
        ptrs = [g.data_ptr() for g in grads]
        if self._sig.get(kind) != sig:
            self._sig[kind], self._grad_ptrs[kind] = sig, ptrs
            return True
        if ptrs != self._grad_ptrs[kind]:
            self._grad_ptrs[kind] = ptrs
            self._patch_grads(kind, grads)
        return False

    def _patch_grads(self, kind: str, grads: list[torch.Tensor]) -> None:
        from apollo_fast.kernels.apollo_tables import AP_G, AW_G

        launches, col = (self.apollo, AP_G) if kind == "apollo" else (self.adamw, AW_G)
        for la in launches:
            for row, i in zip(la.rows, la.idx, strict=True):
                row[col] = grads[i].data_ptr()
            la.meta = _to_device(la.rows, torch.int64, la.key.device)

    # -- building -------------------------------------------------------------------------------

    def sync_apollo(self, t: ApolloLists, h: Hyper, capturable: bool) -> None:
        """Launch classes, tile maps, scratch, collectives' buffers and meta tables for the matrices of `t`."""
        specs = t.shards or [None] * len(t.params)
        sig = tuple(
            (_identity(p, s), p.data_ptr(), m.data_ptr(), id(st), proj is None, 0 if c is None else c.data_ptr())
            for p, s, m, st, proj, c in zip(
                t.params, specs, t.exp_avgs, t.steps, t.projections, t.compensations, strict=True
            )
        )
        if not self._stale("apollo", sig, t.grads):
            return
        classes: dict[LaunchKey, _ApolloLaunch] = {}
        for i, (p, g, m, spec) in enumerate(zip(t.params, t.grads, t.exp_avgs, specs, strict=True)):
            block_r = min(_MAX_BLOCK_R, max(16, _next_pow2(m.shape[1])))
            shape = p.shape if spec is None else spec.shape
            kind = PLAIN if spec is None else CHANNEL_SHARDS if spec.channel_sharded else SPREAD_SHARDS
            group = None if spec is None else spec.group
            key = LaunchKey(p.device, p.dtype, g.dtype, shape[0] >= shape[1], block_r, kind, group)
            classes.setdefault(key, _ApolloLaunch(key)).idx.append(i)
        self.apollo = list(classes.values())
        comms: dict[object, _ShardComm] = {}
        plans = {}
        for la in self.apollo:
            if la.key.shard != PLAIN:
                spec = specs[la.idx[0]]
                la.comm = comms.setdefault(spec.group, _ShardComm(spec.group, spec.world, spec.rank, la.key.device))
                plans[id(la)] = _plan_comm(la, t, specs)
        self.comms = list(comms.values())
        for comm in self.comms:
            comm.allocate()
        for la in self.apollo:
            self._build_apollo(la, t, h, capturable, specs, plans.get(id(la)))

    def _build_apollo(
        self,
        la: _ApolloLaunch,
        t: ApolloLists,
        h: Hyper,
        capturable: bool,
        specs: list[ShardSpec | None],
        plan: list[tuple[int, int, int, int, int]] | None,
    ) -> None:
        """One class's tables; `plan`: its sharded matrices' places in the collectives (see _plan_comm)."""
        from apollo_fast.kernels import apollo_tables as T

        dev, spread = la.key.device, la.key.shard == SPREAD_SHARDS
        la.block_d = 64 if la.key.g_dtype in (torch.float16, torch.bfloat16) else 32
        ranks = [t.exp_avgs[i].shape[1] for i in la.idx]
        la.n_rchunk = max(math.ceil(r / la.key.block_r) for r in ranks)
        tiles_px, tiles_a, tiles_c, tiles_b, offsets = [], [], [], [], []
        c_off = r_off = p_off = 0
        for j, (i, r) in enumerate(zip(la.idx, ranks, strict=True)):
            m, n = t.params[i].shape  # the local shard's
            C, d = (m, n) if la.key.tall else (n, m)
            channels = plan[j][1] if spread else C  # stage B's
            shift = 0 if specs[i] is None else specs[i].block()[1] % 4  # pass C's first column tile starts there
            offsets.append((c_off, r_off, p_off))
            tiles_px.append(math.ceil(r * d / 1024))
            tiles_a.append(math.ceil(C / la.block_c))
            tiles_b.append(math.ceil(channels / la.block_c))
            tiles_c.append(math.ceil(m / la.block_m) * math.ceil((n + shift) / la.block_n))
            if not spread:  # compressed-side shards use the collectives' buffers instead
                c_off, r_off = c_off + C, r_off + C * r
            p_off += r * d if t.projections[i] is None else 0
        maps = [_tile_map(tiles, dev) for tiles in (tiles_px, tiles_a, tiles_c)]
        la.maps = (*maps, _tile_map(tiles_b, dev) if spread else maps[1])
        starts = [_starts(tiles) for tiles in (tiles_px, tiles_a, tiles_c, tiles_b)]
        la.ws = la.comm.ws if spread else torch.empty((3, c_off), dtype=torch.float32, device=dev)
        la.r_buf = torch.empty(r_off, dtype=torch.float32, device=dev)
        la.p_buf = torch.empty(p_off, dtype=torch.float32, device=dev)
        la.p_refresh = torch.zeros(sum(tiles_px), dtype=torch.int64, device=dev)
        if self.poison_scratch:  # P~ is poisoned once, when allocated: it is kept between refreshes
            la.p_buf.fill_(float("nan"))
        la.rows = []
        for j, (i, r) in enumerate(zip(la.idx, ranks, strict=True)):
            p, spec = t.params[i], specs[i]
            m, n = p.shape
            C, d = (m, n) if la.key.tall else (n, m)
            c_off, r_off, p_off = offsets[j]
            row = [0] * T.AP_WIDTH.value
            row[T.AP_G], row[T.AP_W] = t.grads[i].data_ptr(), p.data_ptr()
            row[T.AP_M], row[T.AP_V] = t.exp_avgs[i].data_ptr(), t.exp_avg_sqs[i].data_ptr()
            row[T.AP_C], row[T.AP_D], row[T.AP_RANK] = C, d, r
            row[T.AP_KEY_LO], row[T.AP_KEY_HI] = t.keys[i], h.seed
            row[T.AP_STEP] = t.steps[i].data_ptr() if capturable else 0
            row[T.AP_LIM] = t.limiter_norms[i].data_ptr()
            row[T.AP_TILE_PX], row[T.AP_TILE_A], row[T.AP_TILE_C], row[T.AP_TILE_B] = (s[j] for s in starts)
            row[T.AP_COMP] = 0 if t.compensations[i] is None else t.compensations[i].data_ptr()
            row[T.AP_D_FULL], row[T.AP_D_OFF] = (d, 0) if spec is None else (min(spec.shape), spec.lo if spread else 0)
            proj = t.projections[i]
            if proj is None:  # Philox P~, regenerated into scratch: the columns this rank holds
                row[T.AP_P], row[T.AP_P_STRIDE] = la.p_buf.data_ptr() + 4 * p_off, d
            else:  # a stored P~ of the whole matrix, r x d_full
                row[T.AP_P], row[T.AP_P_STRIDE] = proj.data_ptr() + 4 * row[T.AP_D_OFF], proj.shape[1]
            row[T.AP_ROW0], row[T.AP_COL0], row[T.AP_NT] = (0, 0, n) if spec is None else spec.block()
            if spread:
                sum_row, channels, piece, rs_off, ws_off = plan[j]
                row[T.AP_R] = la.comm.rs_send.data_ptr() + 4 * rs_off
                row[T.AP_RB] = la.comm.rs_recv.data_ptr() + 4 * rs_off
                row[T.AP_WS], row[T.AP_CS], row[T.AP_PIECE], row[T.AP_SUM] = ws_off, channels, piece, sum_row
            else:
                row[T.AP_R] = row[T.AP_RB] = la.r_buf.data_ptr() + 4 * r_off
                row[T.AP_WS], row[T.AP_CS] = c_off, C
                row[T.AP_SUM] = 0 if plan is None else plan[j][0]
            la.rows.append(row)
        la.meta = _to_device(la.rows, torch.int64, dev)

    def sync_adamw(self, t: AdamwLists, h: Hyper, capturable: bool) -> None:
        """Launch classes, tile maps and meta tables for the tensors of `t`."""
        from apollo_fast.kernels import apollo_tables as T
        from apollo_fast.kernels.apollo_adamw import ADAMW_BLOCK

        specs = t.shards or [None] * len(t.params)
        sig = tuple(
            (_identity(p, s), p.data_ptr(), m.data_ptr(), id(st), 0 if c is None else c.data_ptr())
            for p, s, m, st, c in zip(t.params, specs, t.exp_avgs, t.steps, t.compensations, strict=True)
        )
        if not self._stale("adamw", sig, t.grads):
            return
        classes: dict[LaunchKey, _AdamwLaunch] = {}
        places = [_rounding_place(p, spec) for p, spec in zip(t.params, specs, strict=True)]
        for i, (p, g) in enumerate(zip(t.params, t.grads, strict=True)):
            quads = places[i][0] or _rounding(h, p.dtype) != "stochastic"  # only stochastic rounding draws bits
            key = LaunchKey(p.device, p.dtype, g.dtype, quads=quads)
            classes.setdefault(key, _AdamwLaunch(key)).idx.append(i)
        self.adamw = list(classes.values())
        for lw in self.adamw:
            tiles = [math.ceil(t.params[i].numel() / ADAMW_BLOCK) for i in lw.idx]
            lw.tile_map = _tile_map(tiles, lw.key.device)
            lw.rows = []
            for i, start in zip(lw.idx, _starts(tiles), strict=True):
                row = [0] * T.AW_WIDTH.value
                row[T.AW_P], row[T.AW_G] = t.params[i].data_ptr(), t.grads[i].data_ptr()
                row[T.AW_M], row[T.AW_V] = t.exp_avgs[i].data_ptr(), t.exp_avg_sqs[i].data_ptr()
                row[T.AW_N], row[T.AW_TILE] = t.params[i].numel(), start
                row[T.AW_STEP] = t.steps[i].data_ptr() if capturable else 0
                row[T.AW_COMP] = 0 if t.compensations[i] is None else t.compensations[i].data_ptr()
                row[T.AW_KEY_LO], row[T.AW_KEY_HI] = t.keys[i], h.seed
                _, row[T.AW_Q0], row[T.AW_ROW0], row[T.AW_COL0], row[T.AW_NL], row[T.AW_NT] = places[i]
                lw.rows.append(row)
            lw.meta = _to_device(lw.rows, torch.int64, lw.key.device)

    def point_at_projections(self, t: ApolloLists) -> None:
        """projection='official': rows point at the stored P~, which is a new tensor after each redraw."""
        from apollo_fast.kernels.apollo_tables import AP_D_OFF, AP_P

        for la in self.apollo:
            changed = False
            for row, i in zip(la.rows, la.idx, strict=True):
                proj = t.projections[i]
                if proj is not None and row[AP_P] != proj.data_ptr() + 4 * row[AP_D_OFF]:
                    row[AP_P], changed = proj.data_ptr() + 4 * row[AP_D_OFF], True
            if changed:
                la.meta = _to_device(la.rows, torch.int64, la.key.device)


def _identity(p: torch.Tensor, spec: ShardSpec | None) -> int:
    """What identifies a parameter between steps: a shard's local tensor is a new view every step, its ShardSpec
    (cached per parameter by the optimizer) is not."""
    return id(p) if spec is None else id(spec)


def _plan_comm(la: _ApolloLaunch, t: ApolloLists, specs: list) -> list[tuple[int, int, int, int, int]]:
    """Place a class of sharded matrices in its process group's collectives: per matrix (row in `sums`, channels of
    its slice, piece, offset in a reduce-scatter rank block, offset in an all-gather rank block); the last four
    only for compressed-side shards."""
    comm, plan = la.comm, []
    for i in la.idx:
        sum_row = comm.n_sums
        comm.n_sums += 1
        if la.key.shard != SPREAD_SHARDS:
            plan.append((sum_row, 0, 0, 0, 0))
            continue
        channels, r = max(specs[i].shape), t.exp_avgs[i].shape[1]
        lo, hi = chunk_range(channels, comm.world, comm.rank)
        piece = -(-channels // comm.world)
        plan.append((sum_row, hi - lo, piece, comm.rs_block, comm.gather_block))
        comm.rs_block += piece * (r + 1)
        comm.gather_block += piece
        comm.atomics |= r > la.key.block_r  # more than one rank chunk: stage B accumulates with atomics
    return plan


def _rounding_place(p: torch.Tensor, spec: ShardSpec | None) -> tuple[bool, int, int, int, int, int]:
    """(quads, q0, row0, col0, nl, nt): where the elements of `p` (a tensor, or a shard's local tensor) lie in the
    matrix view of the whole tensor that stochastic rounding bits are indexed by (reference.rounding: a matrix as
    it is, any other tensor one row): local element k at row row0 + k // nl, column col0 + k % nl of nt. quads:
    the elements come in whole groups of 4 in order (counter q0 + k // 4, word k % 4)."""
    matrix = p.dim() == 2
    nl = max(1, p.shape[1] if matrix else p.numel())
    row0, col0, nt = (0, 0, nl) if spec is None else spec.block()
    groups = -(-nt // 4)
    if (not matrix or p.shape[0] <= 1) and col0 % 4 == 0:  # one row, starting at a group
        return True, row0 * groups + col0 // 4, row0, col0, nl, nt
    if nl == nt and nt % 4 == 0:  # whole rows of whole groups
        return True, row0 * groups, row0, col0, nl, nt
    return False, 0, row0, col0, nl, nt


def _rounding(h: Hyper, w_dtype: torch.dtype) -> str:
    """The rounding mode of a launch class: the group's for 16-bit parameters; fp32 parameters store as they are."""
    return h.param_rounding if w_dtype in (torch.bfloat16, torch.float16) else "nearest"


def _lr_tensor(h: Hyper, device: torch.device, capturable: bool, dummy: torch.Tensor) -> torch.Tensor:
    """lr as a device tensor (capturable), else a placeholder pointer the kernels never read."""
    if not capturable:
        return dummy
    if isinstance(h.lr, torch.Tensor):
        return h.lr
    return torch.full((), float(h.lr), dtype=torch.float32, device=device)


def fused_apollo_project(
    t: ApolloLists, h: Hyper, found_inf: dict[torch.device, torch.Tensor], launches: FusedLaunches, *, capturable: bool
) -> None:
    """P~ up to date and pass A (R and ||G_k||^2 into scratch) for every matrix of `t`; found_inf[device] (int32)
    is raised for a non-finite gradient (in this rank's shards: the caller all-reduces it). Changes no optimizer
    state, except that capturable device step counters already count this step (the caller takes it back on a
    skip)."""
    from apollo_fast.kernels.apollo_philox import philox_projection_group
    from apollo_fast.kernels.apollo_project import apollo_project_group

    if not t.params:
        return
    launches.sync_apollo(t, h, capturable)
    launches.point_at_projections(t)
    if capturable:
        torch._foreach_add_(t.steps, 1.0)
    if launches.poison_scratch:
        for comm in launches.comms:
            comm.poison()
    for la in launches.apollo:
        found = found_inf[la.key.device]
        spread = la.key.shard == SPREAD_SHARDS
        la.dyn = found  # placeholder pointer: capturable kernels read the device step instead
        if not capturable:
            taken = launches.host_steps([t.steps[i] for i in la.idx])
            rows = []
            for s in taken:  # this step is s + 1
                eta = apollo_step_size(float(h.lr), h.beta1, h.beta2, s + 1)
                rows.append([eta * h.alpha, float(refresh_index(s + 1, h.update_proj_gap)), float(s == 0), s + 1.0])
            la.dyn = _to_device(rows, torch.float64, la.key.device)
        if not spread:  # the collectives' buffers of compressed-side shards are poisoned and zeroed per process group
            if launches.poison_scratch:
                la.ws.fill_(float("nan"))
                la.r_buf.fill_(float("nan"))
            if la.n_rchunk > 1:
                la.ws[:2].zero_()  # nn and rr are accumulated with atomics over rank chunks
        with _on(la.key.device):
            if t.projections[la.idx[0]] is None and la.maps[0].numel():
                philox_projection_group(
                    la.meta, la.dyn, la.maps[0], la.p_refresh, h.update_proj_gap, capturable, spread=spread
                )
            if not la.maps[1].numel():  # shards without channels on this rank
                continue
            apollo_project_group(
                la.meta, la.maps[1], la.ws[2], found,
                sign=h.sign, g_dtype=tl_dtype(la.key.g_dtype), tall=la.key.tall, spread=spread,
                rs_block=la.comm.rs_block if spread else 0, n_rchunk=la.n_rchunk, block_c=la.block_c,
                block_r=la.key.block_r, block_d=la.block_d, dot_precision=launches.dot_precision,
            )  # fmt: skip


def fused_apollo_update(
    t: ApolloLists,
    h: Hyper,
    found_inf: dict[torch.device, torch.Tensor],
    launches: FusedLaunches,
    *,
    capturable: bool,
    skip_on_found: bool,
) -> None:
    """Stage B and pass C for every matrix of `t`, after fused_apollo_project on the same lists this step.
    skip_on_found: every kernel leaves everything untouched when found_inf is raised (decided on the device; the
    collectives of sharded matrices still run, so that every rank makes the same calls).

    Sharded matrices, per process group: reduce-scatter, then the moments and the first part of the scale kernel
    of every class, the all-reduce, the second part, the all-gather (channel scaling), and pass C."""
    from apollo_fast.kernels import apollo_update as U

    if not t.params:
        return
    channel = h.scale_type == "channel"
    for comm in launches.comms:
        if comm.rs_block:
            if comm.atomics:
                comm.ws[:2].zero_()  # nn and rr are accumulated with atomics over rank chunks
            reduce_scatter_single(comm.rs_recv, comm.rs_send, group=comm.group)
    scale = dict(alpha=h.alpha, beta1=h.beta1, beta2=h.beta2, gamma=h.norm_growth_limit, sign=h.sign,
                 capturable=capturable, skip_on_found=skip_on_found, channel=channel)  # fmt: skip
    for la in launches.apollo:
        found = found_inf[la.key.device]
        spread = la.key.shard == SPREAD_SHARDS
        nn, rr, gg = la.ws[0], la.ws[1], la.ws[2]
        with _on(la.key.device):
            if la.maps[3].numel():
                U.apollo_moments_group(
                    la.meta, la.maps[3], nn, rr, gg, found,
                    beta1=h.beta1, beta2=h.beta2, eps=h.eps, m_dtype=tl_dtype(t.exp_avgs[la.idx[0]].dtype),
                    skip_on_found=skip_on_found, spread=spread, n_rchunk=la.n_rchunk, block_c=la.block_c,
                    block_r=la.key.block_r,
                )  # fmt: skip
            lr_t = _lr_tensor(h, la.key.device, capturable, found)
            mode, sums = ("whole", None) if la.comm is None else ("partial", la.comm.sums)
            U.apollo_scale_group(la.meta, la.dyn, nn, rr, gg, found, lr_t, mode=mode, sums=sums, **scale)
    for comm in launches.comms:
        dist.all_reduce(comm.sums, group=comm.group)
    for la in launches.apollo:
        if la.comm is not None:
            found = found_inf[la.key.device]
            lr_t = _lr_tensor(h, la.key.device, capturable, found)
            with _on(la.key.device):
                U.apollo_scale_group(
                    la.meta, la.dyn, la.ws[0], la.ws[1], la.ws[2], found, lr_t,
                    mode="final", spread=la.key.shard == SPREAD_SHARDS, sums=la.comm.sums,
                    coef_all=la.comm.gathered, gather_block=la.comm.gather_block, world=la.comm.world, **scale,
                )  # fmt: skip
    for comm in launches.comms:
        if comm.gather_block and channel:  # tensor scaling: the final scale kernel wrote the whole vectors
            all_gather_single(comm.gathered, comm.ws[0], group=comm.group)
    for la in launches.apollo:
        found = found_inf[la.key.device]
        spread = la.key.shard == SPREAD_SHARDS
        if not la.maps[2].numel():
            continue
        with _on(la.key.device):
            U.apollo_update_group(
                la.meta, la.dyn, la.maps[2], la.comm.gathered if spread else la.ws[0], found,
                _lr_tensor(h, la.key.device, capturable, found),
                lr_wd=0.0 if capturable else float(h.lr) * h.weight_decay,
                weight_decay=h.weight_decay, w_dtype=tl_dtype(la.key.w_dtype), g_dtype=tl_dtype(la.key.g_dtype),
                tall=la.key.tall, capturable=capturable, skip_on_found=skip_on_found,
                rounding=_rounding(h, la.key.w_dtype), block_m=la.block_m, block_n=la.block_n, shard=la.key.shard,
                gather_block=la.comm.gather_block if spread else 0,
            )  # fmt: skip
    if not capturable:
        launches.count_steps(t.steps)


def fused_adamw_check(
    t: AdamwLists,
    h: Hyper,
    found_inf: dict[torch.device, torch.Tensor],
    launches: FusedLaunches,
    *,
    capturable: bool,
) -> None:
    """Raise found_inf[device] if any gradient of `t` holds inf/NaN (one launch per class). Capturable device
    step counters already count this step afterwards (the caller takes it back on a skip)."""
    from apollo_fast.kernels.apollo_adamw import nonfinite_check_group

    if not t.params:
        return
    launches.sync_adamw(t, h, capturable)
    if capturable:
        torch._foreach_add_(t.steps, 1.0)
    for lw in launches.adamw:
        if not lw.tile_map.numel():  # shards without elements on this rank
            continue
        with _on(lw.key.device):
            nonfinite_check_group(lw.meta, lw.tile_map, found_inf[lw.key.device], tl_dtype(lw.key.g_dtype))


def fused_adamw(
    t: AdamwLists,
    h: Hyper,
    found_inf: dict[torch.device, torch.Tensor],
    launches: FusedLaunches,
    *,
    capturable: bool,
    skip_on_found: bool,
) -> None:
    """AdamW (torch.optim.AdamW's formula) for every tensor of `t`, after fused_adamw_check this step."""
    from apollo_fast.kernels.apollo_adamw import adamw_group

    if not t.params:
        return
    for lw in launches.adamw:
        found = found_inf[lw.key.device]
        if capturable:
            lw.dyn = found  # placeholder pointer: the kernel reads the device step
        else:
            rows = []
            for s in launches.host_steps([t.steps[i] for i in lw.idx]):
                bc1, bc2 = bias_corrections(h.beta1, h.beta2, s + 1)
                rows.append([float(h.lr) / bc1, math.sqrt(bc2), s + 1.0])
            lw.dyn = _to_device(rows, torch.float64, lw.key.device)
        if not lw.tile_map.numel():  # shards without elements on this rank
            continue
        with _on(lw.key.device):
            adamw_group(
                lw.meta, lw.dyn, lw.tile_map, found, _lr_tensor(h, lw.key.device, capturable, found),
                decay=1.0 if capturable else 1.0 - float(h.lr) * h.weight_decay, beta1=h.beta1, beta2=h.beta2,
                eps=h.eps, weight_decay=h.weight_decay, sign=h.sign, p_dtype=tl_dtype(lw.key.w_dtype),
                g_dtype=tl_dtype(lw.key.g_dtype), capturable=capturable, skip_on_found=skip_on_found,
                rounding=_rounding(h, lw.key.w_dtype), quads=lw.key.quads,
            )  # fmt: skip
    if not capturable:
        launches.count_steps(t.steps)
