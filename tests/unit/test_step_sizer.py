"""Adaptive step size: the largest token budget whose predicted step time meets the target."""

from streamer.engine.adaptive import StepSizer


def test_without_a_target_the_budget_stays_at_the_maximum() -> None:
    sizer = StepSizer(None, lowest=8, highest=512)
    for tokens in (10, 100, 500, 50):
        sizer.observe(tokens, tokens * 0.01)
    assert sizer.budget() == 512


def test_budget_follows_the_fitted_line_of_step_time_against_tokens() -> None:
    sizer = StepSizer(0.5, lowest=8, highest=512)
    for tokens in (16, 64, 128, 256, 32, 200):
        sizer.observe(tokens, 0.1 + 0.002 * tokens)  # 100 ms fixed + 2 ms per token
    assert sizer.budget() == 200  # (0.5 - 0.1) / 0.002


def test_budget_is_clamped_to_its_bounds() -> None:
    slow = StepSizer(0.05, lowest=40, highest=512)
    fast = StepSizer(10.0, lowest=40, highest=512)
    for tokens in (16, 64, 128, 256):
        slow.observe(tokens, 0.1 + 0.01 * tokens)
        fast.observe(tokens, 0.001 * tokens)
    assert slow.budget() == 40
    assert fast.budget() == 512


def test_too_few_or_identical_steps_give_no_fit_and_the_maximum() -> None:
    sizer = StepSizer(0.1, lowest=8, highest=256)
    for _ in range(10):
        sizer.observe(32, 5.0)
    assert sizer.budget() == 256
