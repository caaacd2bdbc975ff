"""The circuit breaker of a drafter that keeps failing."""

from __future__ import annotations


class CircuitBreaker:
    """Trips when a drafter keeps failing, so that a broken drafter costs nothing for a while
    instead of failing (and turning another request plain) at every step; retries later.

    Counted in decode steps (deterministic, testable): `failures` failures within `window` steps
    open it for `cooldown` steps; each trip doubles the next cooldown (up to `max_cooldown`), and a
    full window without failure after a retry restores the base cooldown.
    """

    # A drafter that fails FAILURES times within WINDOW decode steps is broken, not unlucky (the
    # fault tests inject up to 30% per call; a real bug fails every call): off for COOLDOWN steps
    # (a few seconds of decoding), doubling per trip up to MAX_COOLDOWN (four doublings: minutes).
    FAILURES = 5
    WINDOW = 50
    COOLDOWN = 200
    MAX_COOLDOWN = 3200

    def __init__(self, failures: int = FAILURES, window: int = WINDOW, cooldown: int = COOLDOWN,
                 max_cooldown: int = MAX_COOLDOWN):
        self.failures, self.window = failures, window
        self.base_cooldown, self.max_cooldown = cooldown, max_cooldown
        self.cooldown = cooldown
        self.now = 0
        self.open_until = 0
        self.recent: list[int] = []
        self.trips = 0

    def step(self) -> None:
        self.now += 1
        if self.cooldown != self.base_cooldown and self.now >= self.open_until + self.window \
                and not self.recent:
            self.cooldown = self.base_cooldown

    @property
    def closed(self) -> bool:
        return self.now >= self.open_until

    def failed(self) -> bool:
        """Record a failure; True if it tripped the breaker."""
        self.recent = [t for t in self.recent if self.now - t < self.window] + [self.now]
        if len(self.recent) < self.failures:
            return False
        self.open_until = self.now + self.cooldown
        self.cooldown = min(2 * self.cooldown, self.max_cooldown)
        self.recent = []
        self.trips += 1
        return True
