"""A token bucket per key, in memory: `burst` requests at once, `rate` a second after that.

Kept by hand rather than with a library: it is twenty lines, and the libraries for it
(slowapi, limits) bring storage backends and decorators this one process does not need.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when)
        self.lock = threading.Lock()

    def take(self, key_id: str) -> int | None:
        """Spend one request of `key_id`'s allowance: None when it may go ahead, else the
        whole seconds to wait (for `Retry-After`)."""
        with self.lock:
            now = self.clock()
            tokens, then = self.buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1.0:
                self.buckets[key_id] = (tokens - 1.0, now)
                return None
            self.buckets[key_id] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))
