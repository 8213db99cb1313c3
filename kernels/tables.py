"""Row layouts of the int64 tables that multi-tensor launches read (one row per tensor).

A launch covers a group of tensors of one dtype and shape class; each program finds its tensor
through an int32 tile -> row map and reads that row: raw addresses, sizes, tile offsets, and
per-tensor scalars stored as float64 bit patterns. Plain ints here; kernels wrap them in constexpr.
"""

from __future__ import annotations

# APOLLO matrix rows (shared by the Philox, projection, moment, scale and update kernels).
AP_G = 0  # gradient address (m x n, contiguous)
AP_W = 1  # parameter address (m x n, contiguous)
AP_M = 2  # exp_avg address (C x r)
AP_V = 3  # exp_avg_sq address (C x r)
AP_P = 4  # P~ address (r x d fp32)
AP_R = 5  # R scratch address (C x r fp32)
AP_WS = 6  # element offset of this matrix's C channels in the per-channel workspaces
AP_C = 7  # channels, max(m, n)
AP_D = 8  # compressed side, min(m, n)
AP_RANK = 9  # r
AP_KEY_LO = 10  # Philox key word 0: parameter index
AP_KEY_HI = 11  # Philox key word 1: seed
AP_REFRESH = 12  # refresh index (non-capturable)
AP_STEP = 13  # address of the fp32 step counter (capturable)
AP_LIM = 14  # address of the limiter's previous norm (fp32)
AP_FIRST = 15  # 1 on the first step (non-capturable)
AP_TILE_PX = 16  # first tile of this matrix in the Philox launch
AP_TILE_A = 17  # first tile in the projection / moment launches
AP_TILE_C = 18  # first tile in the update launch
AP_ETA = 19  # eta_t * alpha as float64 bits (non-capturable)
AP_WIDTH = 20

# AdamW rows (flat tensors).
AW_P = 0
AW_G = 1
AW_M = 2
AW_V = 3
AW_N = 4  # numel
AW_TILE = 5  # first tile of this tensor
AW_STEP = 6  # address of the fp32 step counter (capturable)
AW_STEP_SIZE = 7  # lr / (1 - b1^t) as float64 bits (non-capturable)
AW_BC2 = 8  # sqrt(1 - b2^t) as float64 bits (non-capturable)
AW_WIDTH = 9
