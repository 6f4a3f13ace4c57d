"""Step sizing from measured latency, in the spirit of Apache Beam's BatchElements.

A model step's time grows about linearly with the tokens it computes: t = a + b * tokens (a is the
fixed cost of reading the weights, b the cost per token). The sizer fits that line to the recent
steps and offers the largest token budget whose predicted time stays within the target, so a step
that carries a long prefill never delays the running decodes by more than the target. Pure: the
caller measures and reports; nothing here reads a clock.
"""

from __future__ import annotations

from collections import deque


class StepSizer:
    def __init__(self, target_s: float | None, lowest: int, highest: int, window: int = 32) -> None:
        """`target_s` None keeps the budget at `highest` (sizing off)."""
        if not 1 <= lowest <= highest:
            raise ValueError(f"need 1 <= lowest <= highest, got {lowest}, {highest}")
        if target_s is not None and target_s <= 0:
            raise ValueError(f"target must be > 0, got {target_s}")
        self.target_s = target_s
        self.lowest = lowest
        self.highest = highest
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        self._samples.append((tokens, seconds))

    def budget(self) -> int:
        """Tokens the next step may compute."""
        line = self._fit()
        if self.target_s is None or line is None:
            return self.highest
        fixed, per_token = line
        if per_token <= 0:
            return self.highest
        fitting = int((self.target_s - fixed) / per_token)
        return max(self.lowest, min(self.highest, fitting))

    def _fit(self) -> tuple[float, float] | None:
        """Least-squares (a, b) over the window; None until the steps differ in size."""
        n = len(self._samples)
        if n < 4:
            return None
        mean_x = sum(x for x, _ in self._samples) / n
        mean_y = sum(y for _, y in self._samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in self._samples)
        if var == 0:
            return None
        slope = sum((x - mean_x) * (y - mean_y) for x, y in self._samples) / var
        return mean_y - slope * mean_x, slope
