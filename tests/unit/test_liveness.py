"""Liveness: /healthz fails when the pipeline died, cannot rejoin its group, or stalls with work waiting;
never for an outage of Redis or Kafka (a restart would not help: readiness shows those)."""

from __future__ import annotations

from streamer.observe.liveness import Liveness, Seen

TIMEOUT_S = 60.0


def seen(now_s: float, **changes: object) -> Seen:
    fields: dict[str, object] = {"now_s": now_s, "lag": 10, "consumed": 0, "committed": 0, "model_busy": False,
                                 "outage": False, "in_group": True, "brokers_up": True}
    return Seen(**(fields | changes))  # type: ignore[arg-type]


def test_a_pipeline_that_consumes_or_commits_is_alive_however_long_it_runs() -> None:
    alive = Liveness(TIMEOUT_S)
    for t in range(0, 600, 5):
        alive.report(seen(float(t), consumed=t))
    assert alive.problem() is None


def test_input_waiting_with_nothing_consumed_or_committed_and_the_model_idle_is_a_stall() -> None:
    """The shape of review finding 6: an exactly-once writer retrying for ever, the consumer unpolled."""
    alive = Liveness(TIMEOUT_S)
    alive.report(seen(0.0, consumed=5))
    alive.report(seen(30.0, consumed=5))
    assert alive.problem() is None
    alive.report(seen(61.0, consumed=5))
    assert alive.problem() is not None and "stalled" in alive.problem()


def test_no_input_waiting_a_busy_model_or_an_outage_is_not_a_stall() -> None:
    for quiet in ({"lag": 0}, {"model_busy": True}, {"outage": True}):
        alive = Liveness(TIMEOUT_S)
        for t in range(0, 300, 10):
            alive.report(seen(float(t), **quiet))
        assert alive.problem() is None, quiet


def test_a_consumer_out_of_its_group_while_its_brokers_answer_is_restarted() -> None:
    away, out = Liveness(TIMEOUT_S), Liveness(TIMEOUT_S)
    for t in range(0, 120, 10):
        away.report(seen(float(t), consumed=t, in_group=False, brokers_up=False))  # a broker outage
        out.report(seen(float(t), consumed=t, in_group=False))
    assert away.problem() is None
    assert out.problem() is not None and "group" in out.problem()


def test_a_dead_task_fails_at_once() -> None:
    """Before, /readyz stayed green for the 30 s of the shutdown after the writer died."""
    alive = Liveness(TIMEOUT_S)
    alive.failed("a pipeline task died: ValueError()")
    assert alive.problem() == "a pipeline task died: ValueError()"
