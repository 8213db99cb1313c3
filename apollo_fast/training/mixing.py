"""The training stream: behaviour examples and general data interleaved by a deterministic schedule.

What "exact" means (f = the general fraction, a rational number p/q):
- mix_by="examples": after every prefix of N items the number of general items is
  floor(f*N + 1/2), i.e. f*N rounded half up: never more than half an item away from f*N.
- mix_by="tokens": an item's size is its trained tokens (tokens carrying loss). Each item comes from
  the source that leaves D = G - f*T (G general tokens, T all tokens so far) nearer to zero (ties go
  to behaviour), so after every item |D| <= max(f * largest behaviour item, (1-f) * largest general
  item): never more than one item's tokens away from the stated fraction.
No coin flips: the schedule is integer arithmetic on the counts. Inside each pool the order is a
fresh permutation per epoch drawn by numpy's PCG64 seeded with (seed, pool, epoch), so the stream is
a pure function of (data, fraction, mix_by, seed), and its whole state is a handful of integers
(`state_dict()`), which a checkpoint stores to continue the identical stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

__all__ = ["MixedStream", "parse_fraction", "MIX_BY", "BEHAVIOUR", "GENERAL"]

MIX_BY = ("examples", "tokens")
BEHAVIOUR, GENERAL = "behaviour", "general"
_SALT = {BEHAVIOUR: 0, GENERAL: 1}


def parse_fraction(value: str | float | Fraction) -> Fraction:
    """'0.25', '1/3', 0.25 -> an exact Fraction in [0, 1); decimal strings stay exact (0.1 is 1/10)."""
    try:
        frac = Fraction(value) if isinstance(value, (str, Fraction)) else Fraction(repr(float(value)))
    except (ValueError, ZeroDivisionError, TypeError) as err:
        raise ValueError(f"general fraction must be a number like 0.25 or 1/4, got {value!r}") from err
    if not 0 <= frac < 1:
        raise ValueError(f"general fraction must be in [0, 1), got {value!r}")
    return frac


class _Pool:
    """Indices 0..size-1 in a seeded permutation per epoch, cycled forever."""

    def __init__(self, size: int, seed: int, salt: int) -> None:
        self.size, self.seed, self.salt = size, seed, salt
        self._cached: tuple[int, np.ndarray] | None = None

    def index(self, epoch: int, pos: int) -> int:
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, self.salt, epoch])
            self._cached = (epoch, rng.permutation(self.size))
        return int(self._cached[1][pos])


class MixedStream:
    """An endless stream of (source, index): source is 'behaviour' or 'general', index into that pool."""

    def __init__(
        self,
        behaviour_sizes: Sequence[int],
        general_sizes: Sequence[int] = (),
        fraction: str | float | Fraction = 0,
        mix_by: str = "examples",
        seed: int = 0,
    ) -> None:
        """`*_sizes`: trained tokens of each item (only mix_by='tokens' uses the values)."""
        if mix_by not in MIX_BY:
            raise ValueError(f"mix_by must be one of {MIX_BY}, got {mix_by!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        self.fraction = parse_fraction(fraction)
        if not behaviour_sizes:
            raise ValueError("the behaviour pool is empty")
        if self.fraction > 0 and not general_sizes:
            raise ValueError(f"general fraction {self.fraction} needs general data, but the general pool is empty")
        if self.fraction == 0 and general_sizes:
            raise ValueError("general data was given with a general fraction of 0")
        for name, sizes in ((BEHAVIOUR, behaviour_sizes), (GENERAL, general_sizes)):
            if any(int(s) < 1 for s in sizes):
                raise ValueError(f"every {name} item must have at least one trained token")
        self.mix_by, self.seed = mix_by, seed
        self.sizes = {BEHAVIOUR: [int(s) for s in behaviour_sizes], GENERAL: [int(s) for s in general_sizes]}
        self.pools = {src: _Pool(len(self.sizes[src]), seed, _SALT[src]) for src in (BEHAVIOUR, GENERAL)}
        self.reset()

    def reset(self) -> None:
        """Back to the start of the stream."""
        self.items = 0  # items taken so far
        self.count = {BEHAVIOUR: 0, GENERAL: 0}  # items per source
        self.tokens = {BEHAVIOUR: 0, GENERAL: 0}  # trained tokens per source
        self.cursor = {BEHAVIOUR: [0, 0], GENERAL: [0, 0]}  # [epoch, position] per pool

    # -- the schedule ---------------------------------------------------------------------------

    def _peek(self, source: str) -> int:
        epoch, pos = self.cursor[source]
        return self.pools[source].index(epoch, pos)

    def next_source(self) -> str:
        """The source of the next item, without taking it."""
        p, q = self.fraction.numerator, self.fraction.denominator
        if p == 0:
            return BEHAVIOUR
        if self.mix_by == "examples":
            # general items among the first n: floor(f*n + 1/2) = floor((2pn + q) / 2q)
            before = (2 * p * self.items + q) // (2 * q)
            after = (2 * p * (self.items + 1) + q) // (2 * q)
            return GENERAL if after > before else BEHAVIOUR
        # q*D = q*G - p*T in integers; a general item of g tokens adds (q - p)*g, a behaviour item of b adds -p*b
        qd = q * self.tokens[GENERAL] - p * (self.tokens[GENERAL] + self.tokens[BEHAVIOUR])
        g = self.sizes[GENERAL][self._peek(GENERAL)]
        b = self.sizes[BEHAVIOUR][self._peek(BEHAVIOUR)]
        return GENERAL if abs(qd + (q - p) * g) < abs(qd - p * b) else BEHAVIOUR

    def __iter__(self) -> MixedStream:
        return self

    def __next__(self) -> tuple[str, int]:
        source = self.next_source()
        index = self._peek(source)
        cursor = self.cursor[source]
        cursor[1] += 1
        if cursor[1] == len(self.sizes[source]):
            cursor[0], cursor[1] = cursor[0] + 1, 0
        self.items += 1
        self.count[source] += 1
        self.tokens[source] += self.sizes[source][index]
        return source, index

    def take(self, n: int) -> list[tuple[str, int]]:
        """The next n items."""
        return [next(self) for _ in range(n)]

    def items_for_behaviour_epochs(self, epochs: float) -> int:
        """Items from the stream's start until ceil(epochs * behaviour pool size) behaviour items are taken."""
        if not (math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"epochs must be > 0, got {epochs!r}")
        want = math.ceil(epochs * len(self.sizes[BEHAVIOUR]))
        saved = self.state_dict()
        self.reset()
        try:
            while self.count[BEHAVIOUR] < want:
                next(self)
            return self.items
        finally:
            self.load_state_dict(saved)

    # -- checkpointing --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """The position in the stream plus what defines the stream (checked on load). Plain ints and strs."""
        return {
            "items": self.items,
            "count": dict(self.count),
            "tokens": dict(self.tokens),
            "cursor": {k: list(v) for k, v in self.cursor.items()},
            "definition": self._definition(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Continue from `state`; ValueError when it was saved by a different stream definition."""
        if state.get("definition") != self._definition():
            raise ValueError(
                "the checkpoint's data stream differs from this one (data, fraction, mix_by or seed changed): "
                f"saved {state.get('definition')}, now {self._definition()}"
            )
        self.items = int(state["items"])  # type: ignore[arg-type]
        self.count = {k: int(v) for k, v in state["count"].items()}  # type: ignore[union-attr]
        self.tokens = {k: int(v) for k, v in state["tokens"].items()}  # type: ignore[union-attr]
        self.cursor = {k: [int(x) for x in v] for k, v in state["cursor"].items()}  # type: ignore[union-attr]

    def _definition(self) -> dict[str, object]:
        return {
            "fraction": str(self.fraction),
            "mix_by": self.mix_by,
            "seed": self.seed,
            "sizes": {k: len(v) for k, v in self.sizes.items()},
            "tokens": {k: sum(v) for k, v in self.sizes.items()},
        }
