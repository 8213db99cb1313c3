"""Options every probe shares (statistics, scoring, progress) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .inputs import ProbeError

__all__ = ["StatOptions", "DEFAULT_STATS", "check_delta", "verdict_note", "check_ints", "check_seeds", "ci_note"]


@dataclass(frozen=True)
class StatOptions:
    """level: CI coverage; n_boot: bootstrap draws; boot_seed: their generator's seed (fixed: reproducible)."""

    level: float = 0.95
    n_boot: int = 2000
    boot_seed: int = 0

    def check(self) -> None:
        if not (isinstance(self.level, float) and 0.5 <= self.level < 1.0):
            raise ProbeError(f"level must be a number in [0.5, 1), got {self.level!r}")
        if not isinstance(self.n_boot, int) or self.n_boot < 200:
            raise ProbeError(f"n_boot must be an integer >= 200, got {self.n_boot!r}")

    @property
    def kw(self) -> dict[str, Any]:
        return {"level": self.level, "n_boot": self.n_boot, "seed": self.boot_seed}

    @property
    def pct(self) -> str:
        return f"{100 * self.level:g}%"


DEFAULT_STATS = StatOptions()


def check_ints(name: str, values: Any, *, minimum: int = 1, maximum: int | None = None) -> list[int]:
    """A non-empty list of distinct integers in [minimum, maximum], sorted; ProbeError naming the option."""
    try:
        vals = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ProbeError(f"{name} must be integers, got {values!r}") from None
    if not vals:
        raise ProbeError(f"{name} is empty")
    bad = [v for v in vals if v < minimum or (maximum is not None and v > maximum)]
    if bad:
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ProbeError(f"{name}: {bad} out of range (each must be >= {minimum}{upper})")
    return sorted(set(vals))


def check_seeds(seeds: int | Any) -> list[int]:
    """seeds=3 -> [0, 1, 2]; a list is taken as given."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ProbeError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    return check_ints("seeds", seeds, minimum=0)


def ci_note(opts: StatOptions, what: str) -> str:
    return (
        f"Intervals: {opts.pct} percentile bootstrap over {what} ({opts.n_boot} draws, generator seed "
        f"{opts.boot_seed})."
    )


def verdict_note(delta: str, positive: str = "positive", negative: str = "negative") -> str:
    """The verdict legend of a report; delta names the smallest effect of interest with its unit."""
    return (
        f"Verdicts: no effect: the CI lies within +-{delta}, the smallest effect of interest (any effect is "
        f"smaller); otherwise {positive} / {negative}: the CI lies above / below zero; not enough data to tell: "
        f"the CI holds zero and reaches beyond +-{delta}."
    )


def check_delta(name: str, value: float) -> float:
    v = float(value)
    if not (math.isfinite(v) and v >= 0):
        raise ProbeError(f"{name} must be a finite number >= 0, got {value!r}")
    return v
