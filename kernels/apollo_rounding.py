"""Storing an fp32 update result into a bf16/fp16 parameter: round to nearest even, stochastically, or with a
carried residual (int16, in units of 2**-15 of the parameter's ulp). Spec: apollo_fast/reference/rounding.py, bit
for bit: every step is integer or exact arithmetic, so the kernels and the reference agree on every device, the
Triton interpreter included.

Random bits: one Philox4x32-10 call gives the words of 4 consecutive elements of a row (counter
row * ceil(n / 4) + col div 4, then word col mod 4), so a tile draws [rows, cols / 4] counters and interleaves
the four words back into [rows, cols].
"""

from __future__ import annotations

import triton
import triton.language as tl

from .apollo_philox import philox4x32_10

NEAREST = tl.constexpr(0)
STOCHASTIC = tl.constexpr(1)
COMPENSATED = tl.constexpr(2)
ROUNDING_STREAM = tl.constexpr(0x52D)  # the third counter word (reference.rounding.ROUNDING_STREAM)
ROUNDING_CODES = {"nearest": 0, "stochastic": 1, "compensated": 2}


@triton.jit
def rounding_words(quad, step, key_lo, key_hi, SHAPE: tl.constexpr):
    """The 32-bit random words of a tile of elements whose counters (element groups of 4) are `quad` [..., Q]:
    -> uint32 [SHAPE] with SHAPE = quad's shape with the last dim times 4."""
    c0 = quad.to(tl.uint32)
    c1 = tl.zeros_like(c0) + step.to(tl.uint32)
    c2 = tl.zeros_like(c0) + ROUNDING_STREAM
    k0 = tl.zeros_like(c0) + key_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + key_hi.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, k0, k1)
    # join(join(w0, w2), join(w1, w3)) puts w_k at position k of each group of 4 after the reshape
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), SHAPE)


@triton.jit
def element_words(counter, which, step, key_lo, key_hi):
    """The 32-bit random word of each element of a tile whose elements are not laid out in whole groups of 4
    (a row length that is not a multiple of 4, a shard starting inside a group): word `which` (0..3) of counter
    `counter`, one Philox call per element."""
    c0 = counter.to(tl.uint32)
    c1 = tl.zeros_like(c0) + step.to(tl.uint32)
    c2 = tl.zeros_like(c0) + ROUNDING_STREAM
    k0 = tl.zeros_like(c0) + key_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + key_hi.to(tl.uint32)
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, k0, k1)
    return tl.where(which == 0, w0, tl.where(which == 1, w1, tl.where(which == 2, w2, w3)))


@triton.jit
def bf16_nearest(x):
    """fp32 -> the nearest-even bf16 value, still as fp32 (its low 16 bits zero): integer arithmetic, so the
    result does not depend on how a compiler or interpreter rounds conversions."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def bf16_stochastic(x, word):
    """fp32 -> bf16 stochastically (as fp32 with low bits zero): round up iff the dropped 16 bits + (word >> 16)
    carry."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + (word >> 16)) & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def fp16_stochastic(x, word):
    """fp32 -> fp16 stochastically (as an exactly representable fp32): |x| = (f + frac) s with s the fp16 spacing
    at |x|; f + 1 when (word >> 8) 2**-24 < frac."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.minimum(tl.maximum(((bits >> 23) & 0xFF) - 127, -14), 16)
    spacing = ((e - 10 + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - (e - 10)) << 23).to(tl.float32, bitcast=True)
    scaled = tl.abs(x) * inv
    whole = tl.floor(scaled)
    u = (word >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24
    mag = (whole + (u < scaled - whole).to(tl.float32)) * spacing
    return (mag.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)  # sign of x


@triton.jit
def round_to(x, word, W_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """fp32 x -> the value to store in a W_DTYPE parameter (still fp32, exactly representable in W_DTYPE)."""
    if W_DTYPE == tl.bfloat16:
        if ROUNDING == STOCHASTIC:
            return bf16_stochastic(x, word)
        return bf16_nearest(x)
    if W_DTYPE == tl.float16:
        if ROUNDING == STOCHASTIC:
            return fp16_stochastic(x, word)
        return x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _ulp(w, W_DTYPE: tl.constexpr):
    """The spacing from |w| (fp32, exactly a W_DTYPE value) to the next larger W_DTYPE value, in fp32 (exact)."""
    if W_DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        return (bits + 0x10000).to(tl.float32, bitcast=True) - bits.to(tl.float32, bitcast=True)
    bits = w.to(tl.float16).to(tl.int16, bitcast=True) & 0x7FFF
    return (bits + 1).to(tl.float16, bitcast=True).to(tl.float32) - tl.abs(w)


@triton.jit
def with_residual(w, units, W_DTYPE: tl.constexpr):
    """The fp32 value a step updates: the stored w plus its residual (int16 units of 2**-15 ulp)."""
    return w + units.to(tl.float32) * (_ulp(w, W_DTYPE) * 3.0517578125e-05)


@triton.jit
def residual_units(x, stored, W_DTYPE: tl.constexpr):
    """x - stored in int16 units of 2**-15 of stored's ulp, rounded to nearest even (exact scaling, then the
    1.5 * 2**23 trick, which rounds to nearest even for |y| < 2**22 on every backend)."""
    y = (x - stored) / (_ulp(stored, W_DTYPE) * 3.0517578125e-05)
    y = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(y, -32767.0), 32767.0).to(tl.int16)


@triton.jit
def load_value(w_ptr, comp_ptr, offs, mask, W_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """The fp32 value a step updates: the stored parameter, plus its residual in 'compensated' mode."""
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ROUNDING == COMPENSATED:
        w = with_residual(w, tl.load(comp_ptr + offs, mask=mask, other=0), W_DTYPE)
    return w


@triton.jit
def store_value(w_ptr, comp_ptr, offs, mask, x, word, W_DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    """Store the fp32 result x into the parameter by ROUNDING (word: its random words when stochastic), and the
    new residual in 'compensated' mode."""
    stored = round_to(x, word, W_DTYPE, ROUNDING)
    tl.store(w_ptr + offs, stored.to(W_DTYPE), mask=mask)
    if ROUNDING == COMPENSATED:
        tl.store(comp_ptr + offs, residual_units(x, stored, W_DTYPE), mask=mask)
