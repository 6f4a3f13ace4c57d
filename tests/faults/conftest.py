"""Fault scenarios marked `slow` (each restarts services for 20 s or more) run only when asked for:
`pytest -m slow tests/faults` or STREAMER_SLOW_TESTS=1, so `make test` stays within its time."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.faults.scenario import STARTED


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a fault scenario with a 20 s outage; opt in with -m slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("STREAMER_SLOW_TESTS") == "1" or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow fault scenario: run with -m slow or STREAMER_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_service_outlives_its_test() -> Iterator[None]:
    """A failing scenario leaves its `streamer run` processes behind; kill them when the test ends."""
    yield
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait(30)
