"""`streamer dashboard --token` and `streamer serve --api-key` (or their environment variables) reach the
servers they start; nothing is served here, the servers are replaced by recorders."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

from streamer.cli import app


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the commands would have served with."""
    seen: dict[str, Any] = {}

    async def run_dashboard(*args: Any, **options: Any) -> None:
        seen.update(options)

    async def run_server(*args: Any, **options: Any) -> None:
        seen.update(options)

    monkeypatch.setattr("streamer.observe.dashboard.server.run_dashboard", run_dashboard)
    monkeypatch.setattr("streamer.serve.openai.run_server", run_server)
    monkeypatch.setattr("streamer.api.LLMPool.from_settings", lambda *_: object())
    monkeypatch.setattr("streamer.heap.settle_heap", lambda: None)  # the test process's collector stays as it is
    return seen


@pytest.mark.parametrize(("args", "env"), [(["--token", "t0k"], {}), ([], {"STREAMER_DASHBOARD_TOKEN": "t0k"}),
                                           ([], {"STREAMER_OBSERVE__AUTH_TOKEN": "t0k"})])
def test_the_dashboard_token_comes_from_the_option_its_variable_or_the_settings(started, args, env) -> None:
    result = CliRunner().invoke(app, ["dashboard", "--redis-url", "redis://127.0.0.1:1", *args], env=env)
    assert result.exit_code == 0, result.output
    assert started["token"].get_secret_value() == "t0k" and started["max_streams"] == 16


@pytest.mark.parametrize(("args", "env"), [(["--api-key", "k3y"], {}), ([], {"STREAMER_API_KEY": "k3y"})])
def test_serve_passes_the_api_key(started, args, env) -> None:
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    assert result.exit_code == 0, result.output
    assert started["api_key"] == "k3y"


def test_serve_without_a_key_is_open(started) -> None:
    assert CliRunner().invoke(app, ["serve"], env={"STREAMER_API_KEY": ""}).exit_code == 0
    assert started["api_key"] is None
