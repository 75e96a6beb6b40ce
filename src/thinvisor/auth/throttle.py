"""Slowing down password guessing, per source address.

After ``FREE_FAILURES`` failures within ``WINDOW_S``, each further attempt waits
``2 ** (failures - FREE_FAILURES)`` seconds (at most ``MAX_DELAY_S``) after the last
failure. Memory is bounded: at most ``MAX_ADDRESSES`` addresses are remembered, the one
that failed longest ago is forgotten first.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW_S = 600.0
FREE_FAILURES = 3
MAX_DELAY_S = 60.0
MAX_ADDRESSES = 10_000
# Beyond this many failures in the window the delay is at its cap anyway.
_MAX_KEPT = 16


def _key(address: str) -> str:
    """IPv6 clients get a whole /64, so they cannot dodge the throttle by changing address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class LoginThrottle:
    """Remembers failed logins per address and says how long the next attempt must wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def delay(self, address: str) -> float:
        """Seconds ``address`` must still wait before its next attempt; 0 when it may try."""
        key = _key(address)
        now = self._clock()
        with self._lock:
            times = self._recent(key, now)
            if len(times) < FREE_FAILURES:
                return 0.0
            wait = min(MAX_DELAY_S, 2.0 ** (len(times) - FREE_FAILURES))
            return max(0.0, times[-1] + wait - now)

    def failed(self, address: str) -> None:
        """Record a failed attempt from ``address``."""
        key = _key(address)
        now = self._clock()
        with self._lock:
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            self._failures.move_to_end(key)
            while len(self._failures) > MAX_ADDRESSES:
                self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        """Forget ``address``'s failures."""
        with self._lock:
            self._failures.pop(_key(address), None)

    def __len__(self) -> int:
        return len(self._failures)

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key, deque(maxlen=_MAX_KEPT))
        while times and times[0] <= now - WINDOW_S:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times
