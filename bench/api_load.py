"""Load for the API benchmarks: latency samples, percentiles, and a request rate measured
with several clients at once, each in its own thread with its own connection."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

Op = Callable[[str], object]  # one request about the VM of that name


class Reader(Protocol):
    """One client's connection: ``read`` a VM by name, ``close`` when done."""

    def read(self, name: str) -> object: ...

    def close(self) -> None: ...


def cpu_seconds(pids: Sequence[int]) -> float:
    """User and system CPU time the processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_percent(pids: Sequence[int], seconds: float) -> float:
    """The processes' CPU use over ``seconds``, in percent of one core."""
    before, started = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    return 100 * (cpu_seconds(pids) - before) / (time.monotonic() - started)


def elapsed_ms(op: Callable[[], object]) -> float:
    started = time.perf_counter()
    op()
    return (time.perf_counter() - started) * 1000


def samples_ms(op: Callable[[], object], count: int) -> list[float]:
    """The latency of ``count`` calls of ``op``, one after another."""
    return [elapsed_ms(op) for _ in range(count)]


def read_samples_ms(op: Op, names: Sequence[str], count: int, seed: int) -> list[float]:
    """The latency of ``count`` reads of VMs picked at random (the same picks per seed)."""
    rng = random.Random(seed)
    picks = [rng.choice(names) for _ in range(count)]
    return [elapsed_ms(partial(op, n)) for n in picks]


def p99(values: Sequence[float]) -> float:
    """The 99th percentile (inclusive method: never beyond the largest value)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def latency(prefix: str, values: Sequence[float]) -> dict[str, float]:
    return {f"{prefix}_median": statistics.median(values), f"{prefix}_p99": p99(values)}


def rate(
    open_reader: Callable[[], Reader], names: Sequence[str], clients: int, seconds: float
) -> float:
    """Requests per second that ``clients`` concurrent clients complete, each reading
    random VMs back to back for ``seconds``; only requests finished in time count."""
    start: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: start.append(time.monotonic()))
    counts = [0] * clients
    failures: list[BaseException] = []

    def client(index: int) -> None:
        rng = random.Random(index)
        try:
            reader = open_reader()
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()
            return
        try:
            reader.read(names[0])  # connect (TLS handshake) before the clock starts
            barrier.wait()
            deadline = start[0] + seconds
            while True:
                reader.read(rng.choice(names))
                if time.monotonic() > deadline:
                    break
                counts[index] += 1
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()
        finally:
            reader.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return sum(counts) / seconds
