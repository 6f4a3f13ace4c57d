"""The quality gate and the report table: pure logic over measured figures."""

from hypothesis import given
from hypothesis import strategies as st

from streamer.compress.gate import Bounds, check
from streamer.compress.manifest import Figures
from streamer.compress.report import ROWS, cells

ppl = st.floats(min_value=1.0, max_value=1e4)
share = st.floats(min_value=0.0, max_value=1.0)


def figures(perplexity: float, agreement: float | None) -> Figures:
    return Figures(
        params=10,
        disk_bytes=40,
        resident_bytes=40,
        tokens_per_s_b1=5.0,
        tokens_per_s_b32=50.0,
        perplexity=perplexity,
        agreement=agreement,
    )


@given(ppl, ppl, share, st.floats(min_value=1.0, max_value=3.0), share)
def test_the_gate_passes_exactly_when_both_bounds_hold(source_ppl, ppl_, agreement, max_ratio, min_agreement):
    outcome = check(figures(source_ppl, None), figures(ppl_, agreement), Bounds(max_ratio, min_agreement))

    within = ppl_ / source_ppl <= max_ratio and agreement >= min_agreement
    assert outcome.passed is within
    assert len(outcome.reasons) == (ppl_ / source_ppl > max_ratio) + (agreement < min_agreement)


@given(ppl, ppl, share, st.booleans())
def test_force_is_recorded_only_when_it_overrode_a_failure(source_ppl, ppl_, agreement, force):
    outcome = check(figures(source_ppl, None), figures(ppl_, agreement), Bounds(), force=force)
    assert outcome.forced is (force and not outcome.passed)


def test_default_bounds_are_the_documented_ones():
    assert Bounds() == Bounds(max_ppl_ratio=1.30, min_agreement=0.80)


def test_report_cells_give_each_figure_with_its_ratio_to_the_source():
    source, compressed = figures(10.0, None), figures(12.5, 0.9)
    compressed.resident_bytes = 10

    row = dict(zip([label for label, _, _ in ROWS], cells(compressed, source), strict=True))
    assert row["perplexity"] == "12.50 (1.25x)"
    assert row["greedy agreement"] == "90.0%"
    assert row["bytes resident"].endswith("(0.25x)")
    assert dict(zip([label for label, _, _ in ROWS], cells(source, None), strict=True))["greedy agreement"] == "—"
