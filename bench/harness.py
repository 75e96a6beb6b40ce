"""What every benchmark shares: alternating rounds, their statistics, and a result shape.

A comparison runs its contenders in turn (A B A B ...) after a warm-up, so that a noisy
machine slows them alike; each round pair gives a ratio thinvisor / peer, and the ratios
are the figures that count. Results are plain data, written once by ``bench.report``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_ROUNDS = 5
DEFAULT_WARMUP = 1


@dataclass
class Series:
    """One measured quantity of one contender, one value per round."""

    contender: str
    metric: str
    unit: str
    values: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        v = self.values
        if not v:
            return {"n": 0}
        return {
            "n": len(v),
            "median": statistics.median(v),
            "min": min(v),
            "max": max(v),
        }


@dataclass
class Comparison:
    """A metric measured for thinvisor and its peers, round by round."""

    name: str
    metric: str
    unit: str
    series: dict[str, Series] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, contender: str, value: float) -> None:
        self.series.setdefault(contender, Series(contender, self.metric, self.unit))
        self.series[contender].values.append(value)

    def ratios(self, peer: str, base: str = "thinvisor") -> list[float]:
        """thinvisor / peer for each round pair (the same round index)."""
        a = self.series.get(base)
        b = self.series.get(peer)
        if a is None or b is None:
            return []
        return [x / y for x, y in zip(a.values, b.values, strict=False) if y]

    def to_dict(self) -> dict[str, Any]:
        peers = [c for c in self.series if c != "thinvisor"]
        ratios = {p: self.ratios(p) for p in peers if "thinvisor" in self.series}
        return {
            "name": self.name,
            "metric": self.metric,
            "unit": self.unit,
            "series": {c: {**asdict(s), **s.summary()} for c, s in self.series.items()},
            "ratios": {
                p: {"values": r, "median": statistics.median(r) if r else None}
                for p, r in ratios.items()
            },
            "notes": self.notes,
        }


Round = Callable[[], dict[str, float]]  # one contender's round: metric -> value


def alternate(
    contenders: dict[str, Round],
    comparisons: dict[str, Comparison],
    *,
    rounds: int = DEFAULT_ROUNDS,
    warmup: int = DEFAULT_WARMUP,
    log: Callable[[str], None] = print,
) -> None:
    """Run each contender once per round, in turn, ``warmup`` rounds unrecorded first;
    every metric a round returns goes to the comparison of that name."""
    for n in range(warmup + rounds):
        recorded = n >= warmup
        for name, run in contenders.items():
            started = time.monotonic()
            values = run()
            elapsed = time.monotonic() - started
            label = f"round {n - warmup + 1}" if recorded else "warm-up"
            log(f"  {label}: {name} {fmt(values)} ({elapsed:.1f} s)")
            if recorded:
                for metric, value in values.items():
                    comparisons[metric].add(name, value)


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in values.items())


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(poll)
