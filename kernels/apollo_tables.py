"""The tables the multi-tensor APOLLO launches read (one row per tensor), and the helpers kernels read them with.

A launch covers tensors of one dtype and shape class; each program finds its tensor through an int32
tile -> row map and reads that row. `meta` rows (int64) hold what stays fixed while the tensors do
(addresses, sizes, tile offsets), so they are cached across steps; `dyn` rows (float64) hold what changes
every step when the step counter lives on the host (non-capturable). The field indices are constexprs:
host code indexes rows with them (constexpr has __index__), kernels use them as compile-time constants.

Sharded matrices (optim/sharded.py) hold their LOCAL shard's geometry in AP_C / AP_D (the channels and the
compressed side pass A and pass C run over) and the shard's place in the whole matrix in the fields below
AP_COMP; for a plain matrix those fields describe the whole matrix (offsets 0), so one kernel reads both.
"""

from __future__ import annotations

import triton
import triton.language as tl

# APOLLO matrix meta rows (Philox, projection, moment, scale and update kernels).
AP_G = tl.constexpr(0)  # gradient address (m x n, contiguous)
AP_W = tl.constexpr(1)  # parameter address (m x n, contiguous)
AP_M = tl.constexpr(2)  # exp_avg address (C x r)
AP_V = tl.constexpr(3)  # exp_avg_sq address (C x r)
AP_P = tl.constexpr(4)  # P~ address (r x d fp32)
AP_R = tl.constexpr(5)  # R scratch address (C x r fp32)
AP_WS = tl.constexpr(6)  # element offset of this matrix's C channels in the per-channel workspaces
AP_C = tl.constexpr(7)  # channels, max(m, n)
AP_D = tl.constexpr(8)  # compressed side, min(m, n)
AP_RANK = tl.constexpr(9)  # r
AP_KEY_LO = tl.constexpr(10)  # Philox key word 0: parameter index
AP_KEY_HI = tl.constexpr(11)  # Philox key word 1: seed
AP_STEP = tl.constexpr(12)  # address of the fp32 step counter (capturable)
AP_LIM = tl.constexpr(13)  # address of the limiter's previous norm (fp32)
AP_TILE_PX = tl.constexpr(14)  # first tile of this matrix in the Philox launch
AP_TILE_A = tl.constexpr(15)  # first tile in the projection / moment launches
AP_TILE_C = tl.constexpr(16)  # first tile in the update launch
AP_COMP = tl.constexpr(17)  # address of the int16 rounding residual (param_rounding='compensated'), else 0
AP_P_STRIDE = tl.constexpr(18)  # row stride of P~ in elements (d; a compressed-side shard's stored P~: d of the whole)
AP_D_FULL = tl.constexpr(19)  # d of the whole matrix: the Philox counter of P~[a, b] is a * d_full + d_off + b
AP_D_OFF = tl.constexpr(20)  # first compressed-side index of the local shard (0 unless compressed-side sharded)
AP_CS = tl.constexpr(21)  # channels of stage B (moments, scale): AP_C, or a compressed-side shard's channel slice
AP_RB = tl.constexpr(22)  # address of the R stage B reads (AP_R, or the reduce-scattered slice)
AP_TILE_B = tl.constexpr(23)  # first tile in the moment launch
AP_PIECE = tl.constexpr(24)  # compressed-side shards: channels per rank in the collectives' layout, ceil(C / world)
AP_SUM = tl.constexpr(25)  # sharded matrices: row of the per-matrix scalars the ranks all-reduce
AP_ROW0 = tl.constexpr(26)  # first row of the local shard in the whole matrix (the rounding bits' counters)
AP_COL0 = tl.constexpr(27)  # first column of the local shard in the whole matrix
AP_NT = tl.constexpr(28)  # columns of the whole matrix
AP_WIDTH = tl.constexpr(29)

# APOLLO dyn rows (non-capturable).
APD_ETA = tl.constexpr(0)  # eta_t * alpha
APD_REFRESH = tl.constexpr(1)  # refresh index floor((t - 1) / T)
APD_FIRST = tl.constexpr(2)  # 1.0 on the first step
APD_STEP = tl.constexpr(3)  # t, this step's number (the stochastic rounding bits' counter)
APD_WIDTH = tl.constexpr(4)

# AdamW meta rows (flat tensors).
AW_P = tl.constexpr(0)
AW_G = tl.constexpr(1)
AW_M = tl.constexpr(2)
AW_V = tl.constexpr(3)
AW_N = tl.constexpr(4)  # numel
AW_TILE = tl.constexpr(5)  # first tile of this tensor
AW_STEP = tl.constexpr(6)  # address of the fp32 step counter (capturable)
AW_COMP = tl.constexpr(7)  # address of the int16 rounding residual (param_rounding='compensated'), else 0
AW_KEY_LO = tl.constexpr(8)  # Philox key word 0 of the rounding bits: parameter index
AW_KEY_HI = tl.constexpr(9)  # Philox key word 1: seed
# Where the local elements lie in the whole tensor, seen as the m x n matrix the rounding bits are indexed by (a
# tensor that is not a matrix: one row). Local element k is at row ROW0 + k // NL, column COL0 + k % NL.
AW_Q0 = tl.constexpr(10)  # quad-aligned tensors (class constant QUADS): the counter of local element k is Q0 + k // 4
AW_ROW0 = tl.constexpr(11)
AW_COL0 = tl.constexpr(12)
AW_NL = tl.constexpr(13)  # local elements per row
AW_NT = tl.constexpr(14)  # columns of the whole tensor's matrix view
AW_WIDTH = tl.constexpr(15)

# AdamW dyn rows (non-capturable).
AWD_STEP_SIZE = tl.constexpr(0)  # lr / (1 - b1^t)
AWD_BC2 = tl.constexpr(1)  # sqrt(1 - b2^t)
AWD_STEP = tl.constexpr(2)  # t, this step's number (the stochastic rounding bits' counter)
AWD_WIDTH = tl.constexpr(3)


@triton.jit
def row_of(meta, tile_map, tile, WIDTH: tl.constexpr):
    """(row pointer, row index) of the tensor that owns program tile `tile`."""
    mat = tl.load(tile_map + tile).to(tl.int64)
    return meta + mat * WIDTH, mat


@triton.jit
def field_ptr(row, field: tl.constexpr, DTYPE: tl.constexpr):
    """The address stored in a row's `field`, as a pointer to DTYPE."""
    return tl.load(row + field).to(tl.pointer_type(DTYPE))


@triton.jit
def bias_corrections(step, beta1, beta2):
    """(1 - beta1^t, 1 - beta2^t) for an fp32 step count t: the device-side twin of
    apollo_fast.reference.apollo.bias_corrections, used when the step lives on the device (capturable)."""
    return 1.0 - tl.exp2(step * tl.log2(beta1)), 1.0 - tl.exp2(step * tl.log2(beta2))
