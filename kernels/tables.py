"""Row layouts of the tables that multi-tensor launches read (one row per tensor).

A launch covers a group of tensors of one dtype and shape class; each program finds its tensor
through an int32 tile -> row map and reads that row. `meta` rows (int64) hold what stays fixed
while the tensors do (addresses, sizes, tile offsets), so they are cached across steps; `dyn` rows
(float64) hold what changes every step when the step counter lives on the host (non-capturable).
Plain ints here; kernels wrap them in constexpr.
"""

from __future__ import annotations

# APOLLO matrix meta rows (shared by the Philox, projection, moment, scale and update kernels).
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
AP_STEP = 12  # address of the fp32 step counter (capturable)
AP_LIM = 13  # address of the limiter's previous norm (fp32)
AP_TILE_PX = 14  # first tile of this matrix in the Philox launch
AP_TILE_A = 15  # first tile in the projection / moment launches
AP_TILE_C = 16  # first tile in the update launch
AP_WIDTH = 17

# APOLLO dyn rows (non-capturable).
APD_ETA = 0  # eta_t * alpha
APD_REFRESH = 1  # refresh index floor((t - 1) / T)
APD_FIRST = 2  # 1.0 on the first step
APD_WIDTH = 3

# AdamW meta rows (flat tensors).
AW_P = 0
AW_G = 1
AW_M = 2
AW_V = 3
AW_N = 4  # numel
AW_TILE = 5  # first tile of this tensor
AW_STEP = 6  # address of the fp32 step counter (capturable)
AW_WIDTH = 7

# AdamW dyn rows (non-capturable).
AWD_STEP_SIZE = 0  # lr / (1 - b1^t)
AWD_BC2 = 1  # sqrt(1 - b2^t)
AWD_WIDTH = 2
