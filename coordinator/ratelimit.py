"""Token-bucket rate limits per key (a node id, a source address), kept in memory.

>>> limiter = RateLimiter(rate=1.0, burst=2)
>>> [limiter.allow("node-a", now=0.0) for _ in range(3)]
[True, True, False]
>>> limiter.allow("node-a", now=1.0)
True
"""

import logging
import time

logger = logging.getLogger(__name__)


class RateLimiter:
    """Allow ``burst`` requests at once and ``rate`` per second after that, per key.

    :param rate: tokens added per second
    :param burst: bucket size (requests allowed back to back)
    :param max_keys: buckets kept; the oldest half is dropped beyond it so memory stays bounded
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 200_000):
        assert rate > 0 and burst >= 1, "rate must be > 0 and burst >= 1"
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)

    def allow(self, key: str, *, now: float | None = None) -> bool:
        """Take one token from ``key``'s bucket; False if it is empty (nothing else changes)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            for old in list(self._buckets)[: self.max_keys // 2]:
                del self._buckets[old]
        self._buckets[key] = (tokens - 1.0, now)
        return True
