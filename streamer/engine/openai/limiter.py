"""The adaptive concurrency limit: how many requests may be at the server at once.

AIMD, as TCP does it: every success adds 1/limit (so about one more per round of `limit` requests), and a
sign of congestion (429/503, or a first token much slower than the measured baseline) cuts the limit by a
factor. Only a request sent after the last cut can cut again, so one burst of slow answers to requests that
were all in flight together counts once rather than collapsing the limit to its floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DECREASE = 0.5
_BASELINE_DRIFT = 0.01  # how fast the baseline follows slower latencies up (a min would stick to one lucky sample)


@dataclass
class ConcurrencyLimit:
    floor: int
    ceiling: int
    tolerance: float  # latency above tolerance * baseline is congestion
    value: float = field(init=False)
    epoch: int = field(default=0, init=False)  # bumped by every cut; a request remembers the one it was sent in
    baseline_s: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"need 1 <= floor <= ceiling, got {self.floor}, {self.ceiling}")
        self.value = float(self.ceiling)

    @property
    def limit(self) -> int:
        return int(self.value)

    def succeeded(self, epoch: int, latency_s: float) -> None:
        """A request sent in `epoch` answered; its latency (to the first token) is judged against the baseline."""
        baseline = self.baseline_s
        if baseline is None or latency_s < baseline:
            self.baseline_s = latency_s
        else:
            self.baseline_s = baseline + (latency_s - baseline) * _BASELINE_DRIFT
        if baseline is not None and latency_s > self.tolerance * baseline:
            self.congested(epoch)
        else:
            self.value = min(float(self.ceiling), self.value + 1 / self.value)

    def congested(self, epoch: int) -> None:
        """The server pushed back (429/503) or slowed down, for a request sent in `epoch`."""
        if epoch == self.epoch:
            self.value = max(float(self.floor), self.value * _DECREASE)
            self.epoch += 1
