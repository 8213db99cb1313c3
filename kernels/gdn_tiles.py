"""What every GDN delta-rule program (recurrent and chunked) works out first: its segment and its state tile."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _segment(i_nh, cu_seqlens, T, HV: tl.constexpr, HK: tl.constexpr, VARLEN: tl.constexpr):
    """Program row i_nh = segment * HV + value head -> (segment, value head, key head, first token, end token).
    Tokens are rows of the flattened [B*T] (or packed, VARLEN) layout; value head j reads key head j // (HV/HK)."""
    i_n = i_nh // HV
    i_h = i_nh % HV
    if VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    return i_n, i_h, i_h // (HV // HK), bos, eos


@triton.jit
def _state_tile(i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """V-block i_v of a [K, V] state: K and V offsets, their masks, the tile mask and the tile's element offsets."""
    ok = tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < K
    mv = ov < V
    return ok, ov, mk, mv, mk[:, None] & mv[None, :], ok[:, None] * V + ov[None, :]
