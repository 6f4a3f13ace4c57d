"""The quality gate: a compressed model must stay close enough to its source to be served."""

from __future__ import annotations

from dataclasses import dataclass

from streamer.compress.manifest import Figures, GateOutcome

DEFAULT_MAX_PPL_RATIO = 1.30
DEFAULT_MIN_AGREEMENT = 0.80


@dataclass(frozen=True)
class Bounds:
    max_ppl_ratio: float = DEFAULT_MAX_PPL_RATIO
    min_agreement: float = DEFAULT_MIN_AGREEMENT


def check(source: Figures, compressed: Figures, bounds: Bounds, force: bool = False) -> GateOutcome:
    """Every bound the compressed figures break, with the measured value; passing means none."""
    reasons = []
    ratio = compressed.perplexity / source.perplexity
    if ratio > bounds.max_ppl_ratio:
        reasons.append(
            f"perplexity {compressed.perplexity:.2f} is {ratio:.2f}x the source's (max {bounds.max_ppl_ratio})"
        )
    if compressed.agreement is not None and compressed.agreement < bounds.min_agreement:
        reasons.append(f"greedy agreement {compressed.agreement:.1%} is below {bounds.min_agreement:.0%}")
    return GateOutcome(
        max_ppl_ratio=bounds.max_ppl_ratio,
        min_agreement=bounds.min_agreement,
        passed=not reasons,
        forced=force and bool(reasons),
        reasons=reasons,
    )
