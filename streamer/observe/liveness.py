"""Whether the pipeline is alive in the sense a supervisor cares about: doing its work, or unable to.

`/healthz` fails (a supervisor restarts the process) and `/readyz` turns red when:
- a pipeline task died (the writer, a window stage): the process is stopping;
- the consumer has not been in its group for `stall_timeout_s` while its brokers answer;
- the commit point has not moved for `stall_timeout_s` while input waits (lag), nothing was consumed
  and the model is idle, and no dependency is away (a Redis, broker or model-server outage is waited
  out: readiness shows it, and a restart would not help).

Pure logic: the pipeline reports, at its commit cadence, what it saw; time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Seen:
    """What the pipeline saw at one report."""

    now_s: float
    lag: int  # messages waiting in the input partitions
    consumed: int  # messages handed out so far (a running total)
    committed: int  # commits made so far (a running total)
    model_busy: bool  # requests queued or running
    outage: bool  # a dependency is away: the writer waits for Redis or Kafka, or the model's server is gone
    in_group: bool  # the consumer is joined to its group
    brokers_up: bool  # the consumer reaches the leaders of its partitions


class Liveness:
    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._failure: str | None = None
        self._last: Seen | None = None
        self._progress_s: float | None = None  # when work last moved (or there was none to do)
        self._in_group_s: float | None = None  # when the consumer was last in its group (or could not be)

    def failed(self, why: str) -> None:
        """A pipeline task died: the process is stopping."""
        self._failure = self._failure or why

    def report(self, seen: Seen) -> None:
        last, self._last = self._last, seen
        moved = last is None or seen.consumed != last.consumed or seen.committed != last.committed
        if moved or seen.lag == 0 or seen.model_busy or seen.outage:
            self._progress_s = seen.now_s
        if seen.in_group or not seen.brokers_up or self._in_group_s is None:
            self._in_group_s = seen.now_s

    def problem(self) -> str | None:
        """Why the process should be restarted, or None while it is healthy."""
        if self._failure is not None:
            return self._failure
        seen = self._last
        if seen is None:
            return None
        if self._in_group_s is not None and seen.now_s - self._in_group_s >= self.stall_timeout_s:
            return f"the consumer has not been in its group for {seen.now_s - self._in_group_s:.0f} s"
        if self._progress_s is not None and seen.now_s - self._progress_s >= self.stall_timeout_s:
            return (f"stalled: {seen.lag} messages wait, and nothing was consumed or committed for "
                    f"{seen.now_s - self._progress_s:.0f} s with the model idle")
        return None
