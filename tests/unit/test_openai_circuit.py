"""The circuit breaker's states, with time passed in."""

from streamer.engine.openai.circuit import Circuit, CircuitState


def test_consecutive_failures_open_it_and_a_success_in_between_resets_the_count() -> None:
    circuit = Circuit(threshold=3, open_s=2.0)
    circuit.failed(0.0)
    circuit.failed(0.1)
    circuit.succeeded()
    circuit.failed(0.2)
    circuit.failed(0.3)
    assert circuit.state is CircuitState.CLOSED
    circuit.failed(0.4)
    assert circuit.state is CircuitState.OPEN and circuit.reopens_at() == 2.4


def test_one_probe_after_the_wait_then_success_closes_it() -> None:
    circuit = Circuit(threshold=1, open_s=2.0)
    circuit.failed(10.0)
    assert not circuit.probe_due(11.9)
    assert circuit.probe_due(12.0) and circuit.state is CircuitState.HALF_OPEN
    assert not circuit.probe_due(12.1), "one probe at a time"
    assert circuit.reopens_at() is None
    circuit.succeeded()
    assert circuit.state is CircuitState.CLOSED and circuit.failures == 0


def test_a_failed_probe_opens_it_for_another_wait() -> None:
    circuit = Circuit(threshold=5, open_s=1.0)
    circuit.trip(0.0)
    assert circuit.probe_due(1.0)
    circuit.failed(1.5)
    assert circuit.state is CircuitState.OPEN and circuit.reopens_at() == 2.5
    assert not circuit.probe_due(2.0) and circuit.probe_due(2.5)
