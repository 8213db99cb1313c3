"""Counter-based normal random numbers (Philox4x32-10 + Box-Muller), the spec for in-kernel P.

APOLLO's default projection is regenerated from (key, counter) instead of being stored, so the
Triton kernels recompute exactly these numbers. Everything integer here is bit-exact; the final
`log`/`cos` are fp32 in the kernels and fp64 here, so values agree to fp32 rounding (~1e-7).

Definition, for one normal per counter value c (a 64-bit integer) and a 64-bit key k:
    (x0, x1, x2, x3) = Philox4x32_10(counter=(c_lo, c_hi, 0, 0), key=(k_lo, k_hi))
    u1 = ((x0 >> 8) + 1) * 2**-24          in (0, 1]   (exact in fp32; never 0, so log is finite)
    u2 = (x1 >> 8) * 2**-24                in [0, 1)
    z  = sqrt(-2 ln u1) * cos(2 pi u2)
Philox4x32 round (Salmon et al., SC'11, "Parallel random numbers: as easy as 1, 2, 3"):
    hi0:lo0 = 0xD2511F53 * x0;  hi1:lo1 = 0xCD9E8D57 * x2
    (x0, x1, x2, x3) <- (hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0)
    then k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2**32), ten rounds in all.
"""

from __future__ import annotations

import math

import torch

PHILOX_ROUNDS = 10
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for uint32 values held in int64 (no int64 overflow)."""
    m_lo, m_hi = m & 0xFFFF, m >> 16
    p_lo = a * m_lo  # < 2**48
    p_hi = a * m_hi  # < 2**48; full product = p_hi * 2**16 + p_lo
    mid = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2**49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi & _MASK32, lo


def philox4x32(
    x0: torch.Tensor,
    x1: int | torch.Tensor,
    x2: int | torch.Tensor,
    x3: int | torch.Tensor,
    key: int,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, ...]:
    """Philox4x32 of the counter words (x0, x1, x2, x3) under the 64-bit `key`.

    Words are uint32 values held in int64 tensors (or ints, broadcast to x0's shape); returns the
    four output words the same way. Key words are (key mod 2**32, key >> 32).
    """
    x0 = x0.to(torch.int64) & _MASK32
    x1, x2, x3 = (torch.as_tensor(x, dtype=torch.int64, device=x0.device).expand_as(x0) & _MASK32 for x in (x1, x2, x3))
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    for r in range(rounds):
        hi0, lo0 = _mulhilo32(x0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(x2, PHILOX_M1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
        if r + 1 < rounds:
            k0, k1 = (k0 + PHILOX_W0) & _MASK32, (k1 + PHILOX_W1) & _MASK32
    return x0, x1, x2, x3


def philox_normal(
    counter: torch.Tensor, key: int, counter_hi: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normals, one per element of the int64 `counter` tensor (see module docstring)."""
    x0, x1, _, _ = philox4x32(counter, counter_hi, 0, 0, key)
    u1 = ((x0 >> 8) + 1).to(torch.float64) * 2.0**-24
    u2 = (x1 >> 8).to(torch.float64) * 2.0**-24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.to(dtype)


def projection_key(param_index: int, seed: int) -> int:
    """The Philox key of one parameter: (param_index, seed) packed as two 32-bit words."""
    if not 0 <= param_index < 2**32 or not 0 <= seed < 2**32:
        raise ValueError(f"param_index and seed must be in [0, 2**32), got {param_index}, {seed}")
    return (seed << 32) | param_index


def philox_projection(
    rank: int, dim: int, param_index: int, seed: int, refresh: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The default APOLLO projection P~ (rank x dim, fp32), i.i.d. N(0, 1/rank).

    Element (a, b) is philox_normal(counter=a * dim + b, counter_hi=refresh,
    key=projection_key(param_index, seed)) / sqrt(rank). `dim` is min(m, n) of the matrix: the
    compressed side. Channel vectors g (length dim) are projected as P~ @ g.
    """
    if rank * dim >= 2**32:
        raise ValueError(f"projection of {rank} x {dim} exceeds 2**32 counters")
    counter = torch.arange(rank * dim, device=device, dtype=torch.int64).view(rank, dim)
    z = philox_normal(counter, projection_key(param_index, seed), counter_hi=refresh)
    return z / math.sqrt(rank)
