"""`processing`: at least once unless asked; exactly once takes its transactional id from config or
makes one unique to the process, and reads its input with read_committed."""

from __future__ import annotations

import pytest

from streamer.config import ProcessingSettings, Settings
from streamer.kafka.transactions import CONSUMER_OVERRIDES, producer_overrides, transactional_id


def test_the_default_guarantee_is_at_least_once():
    assert Settings().processing.guarantee == "at_least_once"


def test_the_guarantee_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("STREAMER_PROCESSING__GUARANTEE", "exactly_once")
    monkeypatch.setenv("STREAMER_PROCESSING__TRANSACTIONAL_ID", "streamer-0")
    processing = Settings().processing
    assert (processing.guarantee, processing.transactional_id) == ("exactly_once", "streamer-0")


def test_a_configured_transactional_id_is_kept_so_a_restart_fences_its_predecessor():
    overrides = producer_overrides(ProcessingSettings(transactional_id="streamer-0"), "g")
    assert overrides["transactional.id"] == "streamer-0" and overrides["enable.idempotence"] is True


def test_without_one_each_process_gets_its_own_id_under_the_group():
    ids = {transactional_id(ProcessingSettings(), "g") for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("g-") for i in ids)


def test_exactly_once_reads_only_committed_input():
    assert CONSUMER_OVERRIDES == {"isolation.level": "read_committed"}
