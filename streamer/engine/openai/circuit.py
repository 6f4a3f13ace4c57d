"""The circuit breaker: after `threshold` consecutive failures the server is taken to be away.

Open: nothing is sent and admission stops. After `open_s` one probe may go (half-open); its success closes
the circuit, its failure opens it again for another `open_s`. A request that was already in flight and
succeeds closes it too. Time comes in as an argument, so the states are tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Circuit:
    threshold: int
    open_s: float
    state: CircuitState = field(default=CircuitState.CLOSED, init=False)
    failures: int = field(default=0, init=False)  # consecutive
    opened_s: float = field(default=0.0, init=False)

    def probe_due(self, now_s: float) -> bool:
        """True once per open period, when its wait is over: the caller sends the one probe (half-open)."""
        if self.state is CircuitState.OPEN and now_s >= self.opened_s + self.open_s:
            self.state = CircuitState.HALF_OPEN
            return True
        return False

    def reopens_at(self) -> float | None:
        """When an open circuit lets a probe through; None when it is not open."""
        return self.opened_s + self.open_s if self.state is CircuitState.OPEN else None

    def succeeded(self) -> None:
        self.state, self.failures = CircuitState.CLOSED, 0

    def failed(self, now_s: float) -> None:
        self.failures += 1
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.threshold:
            self.trip(now_s)

    def trip(self, now_s: float) -> None:
        """Open now (the server did not answer at start)."""
        self.state, self.opened_s = CircuitState.OPEN, now_s
