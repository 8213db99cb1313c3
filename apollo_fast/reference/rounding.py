"""How an fp32 update result is stored into a bf16/fp16 parameter: the specification every backend follows.

An update smaller than half an ulp of the weight (about 6e-5 for a bf16 weight of 0.02) is lost when the fp32
result is rounded to the nearest 16-bit value, which is where fine-tuning learning rates live. Three modes:

    "nearest"      round to nearest even: the update is lost below half an ulp (no extra memory)
    "stochastic"   round up with probability equal to the fraction of the gap below: unbiased, E[w] = x, and
                   only the two neighbours of x are possible. Bits are reproducible (see below); no memory
    "compensated"  keep each element's rounding residual and add it back before the next update (Kahan-style),
                   so updates accumulate until they move the stored weight; 2 bytes per element. The value the
                   optimizer works on is param + residual

The residual is an int16 in units of 2**-15 of the parameter's ulp (|residual| <= half an ulp, so 16384 units
at most), not a bf16 number as torch-optimi keeps it: the same 2 bytes resolve 2**-16 of an ulp instead of
2**-9 of the residual, which at lr 1e-5 is the difference between ~1% and ~0.1% of the update lost per step
to the buffer's own rounding (tests/test_param_rounding.py measures both trajectories).

Random bits. Element (i, j) of a parameter stored as an m x n matrix (any other tensor: one row of numel
elements) takes word j mod 4 of Philox4x32-10 with counter (i * ceil(n / 4) + j div 4, step, ROUNDING_STREAM, 0)
and key (parameter index, seed): the same bits on every backend and device, and on a resumed run.
    bf16: r = word >> 16; the fp32 bit pattern plus r, low 16 bits cleared (round up iff the dropped 16 bits
          plus r carry), which is exact and unbiased: P(up) = dropped / 2**16.
    fp16: u = (word >> 8) * 2**-24; with s the fp16 spacing at |x| (2**(max(e, -14) - 10) for |x| in
          [2**e, 2**(e+1))), |x| = (f + frac) s with integer f: store sign(x) (f + [u < frac]) s.
fp32 parameters ignore the mode. Nearest rounding is round-to-nearest-even, as torch's .to() does.
"""

from __future__ import annotations

import torch

from .philox import philox4x32, projection_key

__all__ = [
    "PARAM_ROUNDINGS",
    "RESIDUAL_SCALE",
    "ROUNDING_STREAM",
    "compensated_value",
    "rounding_words",
    "store_rounded",
    "stochastic_round",
    "ulp",
]

PARAM_ROUNDINGS = ("nearest", "stochastic", "compensated")
ROUNDING_STREAM = 0x52D  # third Philox counter word of the rounding bits (projections use 0)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The m x n view the rounding bits are indexed by: a matrix as it is, any other tensor as one row."""
    return t if t.dim() == 2 else t.reshape(1, -1)


def rounding_words(
    shape: tuple[int, int],
    param_index: int,
    seed: int,
    step: int,
    device,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """The 32-bit random word (int64 holding uint32) of every element of an m x n parameter at `step`.

    block: (first row, first column, columns of the whole matrix) when the m x n tensor is a block of a larger
    one (a shard): its elements then take the words of their places in the whole matrix."""
    m, n = shape
    row0, col0, n_total = (0, 0, n) if block is None else block
    groups = -(-n_total // 4)
    i = torch.arange(row0, row0 + m, device=device, dtype=torch.int64)[:, None]
    j = torch.arange(col0, col0 + n, device=device, dtype=torch.int64)[None, :]
    counter = i * groups + torch.div(j, 4, rounding_mode="floor")
    words = philox4x32(counter.flatten(), step, ROUNDING_STREAM, 0, projection_key(param_index, seed))
    pick = (j % 4).expand(m, n).flatten()
    return torch.stack(words).gather(0, pick[None, :])[0].view(m, n)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """fp32 x rounded stochastically to `dtype` (bf16 or fp16) with the 32-bit random words of its elements."""
    x = x.float()
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        bits = (bits + (words >> 16)) & 0xFFFF0000
        bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # back to a signed 32-bit pattern
        return bits.to(torch.int32).view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        e = ((x.view(torch.int32) >> 23) & 0xFF) - 127
        e = e.clamp(min=-14, max=16)  # fp16's subnormal spacing below 2**-14; above 2**16 it is inf anyway
        spacing = ((e - 10 + 127) << 23).view(torch.float32)  # 2**(e - 10), exact
        scaled = x.abs() * ((127 - (e - 10)) << 23).view(torch.float32)  # |x| / spacing, exact
        whole = scaled.floor()
        u = (words >> 8).to(torch.float32) * 2.0**-24
        up = (u < scaled - whole).to(torch.float32)
        return torch.copysign((whole + up) * spacing, x).to(torch.float16)
    raise ValueError(f"stochastic rounding is for bf16 and fp16, not {dtype}")


RESIDUAL_SCALE = 2.0**-15  # the residual's unit: 2**-15 of the parameter's ulp


def ulp(param: torch.Tensor) -> torch.Tensor:
    """fp32 [param's shape]: the spacing from |param| to the next larger bf16/fp16 value (exact)."""
    if param.dtype == torch.bfloat16:
        bits = param.view(torch.int16).to(torch.int32) & 0x7FFF
        return ((bits + 1) << 16).view(torch.float32) - (bits << 16).view(torch.float32)
    bits = param.view(torch.int16) & 0x7FFF
    return (bits + 1).view(torch.float16).float() - bits.view(torch.float16).float()


def compensated_value(param: torch.Tensor, compensation: torch.Tensor | None) -> torch.Tensor:
    """The fp32 value the optimizer updates: the parameter, plus its carried residual when there is one."""
    if compensation is None:
        return param.float()
    return param.float() + compensation.float() * (ulp(param) * RESIDUAL_SCALE)


@torch.no_grad()
def store_rounded(
    param: torch.Tensor,
    value: torch.Tensor,
    rounding: str,
    compensation: torch.Tensor | None = None,
    *,
    param_index: int = 0,
    seed: int = 0,
    step: int = 0,
    block: tuple[int, int, int] | None = None,
) -> None:
    """param <- value (fp32, param's shape) by `rounding`; 'compensated' also writes the new residual
    value - param into `compensation` (int16, units of 2**-15 ulp). fp32 parameters are written as they are.
    block: where `param` lies in the whole parameter when it is a shard (see rounding_words; a non-matrix
    tensor is one row of its elements)."""
    if param.dtype not in LOW_PRECISION or rounding == "nearest":
        param.copy_(value)
        return
    if rounding == "stochastic":
        words = rounding_words(_as_matrix(param).shape, param_index, seed, step, param.device, block)
        param.copy_(stochastic_round(_as_matrix(value), param.dtype, words).view(param.shape))
        return
    if rounding != "compensated":
        raise ValueError(f"param_rounding must be one of {PARAM_ROUNDINGS}, got {rounding!r}")
    param.copy_(value)
    # value - param is exact (within half an ulp of param); in units of 2**-15 ulp it lies in [-16384, 16384]
    units = ((value - param.float()) / (ulp(param) * RESIDUAL_SCALE)).round()
    compensation.copy_(units.clamp(-32767, 32767).to(torch.int16))
