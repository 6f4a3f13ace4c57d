"""examples/faust_app.py as a real Faust worker (from .venv-faust) on the real broker and the real model."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.services import consume_all, create_topic, produce_lines, unique_name, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FAUST_PYTHON = ROOT / ".venv-faust" / "bin" / "python"
WINDOW_S = 4
GRACE_S = 12  # every review must be classified within this long of being produced, or it misses its window
LABELS = ["positive", "negative"]
REVIEWS = {
    "lamp": ["Bright, sturdy and cheap: I love this lamp.", "The switch broke after two days, awful.",
             "Gives a warm light, exactly what I wanted.", "Arrived scratched and the bulb was dead."],
    "kettle": ["Boils fast and quietly, a great kettle.", "It leaks from the lid, very disappointing.",
               "Looks lovely on the counter and works well."],
}  # fmt: skip


def faust_venv_works() -> bool:
    probe = "import faust, torch, streamer.integrations.faust, streamer.api"
    return FAUST_PYTHON.exists() and subprocess.run([FAUST_PYTHON, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def faust_python() -> Path:
    """.venv-faust with streamer linked in (`make faust-venv`, which `make test` runs first); built here if missing."""
    if not faust_venv_works():
        built = subprocess.run(["make", "-s", "faust-venv"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
        if not faust_venv_works():
            pytest.skip(f".venv-faust cannot be built (`make faust-venv`): {(built.stdout + built.stderr)[-1500:]}")
    return FAUST_PYTHON


def test_windows_get_label_counts_and_a_summary(kafka_bootstrap: str, faust_python: Path, tmp_path: Path) -> None:
    reviews_topic, windows_topic = unique_name("reviews"), unique_name("review-windows")
    create_topic(kafka_bootstrap, reviews_topic, partitions=2)
    log = tmp_path / "faust.log"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "REVIEWS_BROKER": f"kafka://{kafka_bootstrap}",
        "REVIEWS_APP_ID": unique_name("faust-reviews"),
        "REVIEWS_INPUT_TOPIC": reviews_topic,
        "REVIEWS_OUTPUT_TOPIC": windows_topic,
        "REVIEWS_PARTITIONS": "2",
        "REVIEWS_WINDOW_S": str(WINDOW_S),
        "REVIEWS_GRACE_S": str(GRACE_S),
        "REVIEWS_LABELS": json.dumps(LABELS),
        "REVIEWS_SUMMARY_TOKENS": "24",
        "REVIEWS_DATADIR": str(tmp_path / "faust-data"),
    }
    command = [faust_python, "examples/faust_app.py", "worker", "-l", "info", "--without-web"]
    with log.open("wb") as out:
        worker = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: "streamer pool ready" in log.read_text() and "Ready" in log.read_text(), 240,
                 "the Faust worker to load the model and start", log)  # fmt: skip
        # Two whole windows that have not started yet, so neither can close before its reviews are in.
        first_ms = (int(time.time()) // WINDOW_S + 1) * WINDOW_S * 1000
        expected: Counter[tuple[str, int]] = Counter()
        values, keys = [], []
        for window_ms in (first_ms, first_ms + WINDOW_S * 1000):
            for key, texts in REVIEWS.items():
                for i, text in enumerate(texts):
                    values.append(json.dumps({"key": key, "text": text, "ts": window_ms + 500 * i}).encode())
                    keys.append(key.encode())
                    expected[key, window_ms] += 1
        produce_lines(kafka_bootstrap, reviews_topic, values, keys)
        last_close_s = 3 * WINDOW_S + GRACE_S  # at the latest, from now
        records = consume_all(kafka_bootstrap, windows_topic, expected=len(expected), timeout_s=last_close_s + 90)
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()

    results = [json.loads(r.value) for r in records]
    got = {(r["key"], r["start"]): r for r in results}
    assert len(results) == len(got), "a window was emitted twice"
    assert set(got) == set(expected), f"windows {sorted(got)}; worker log:\n{log.read_text()[-3000:]}"
    for (key, start), result in got.items():
        assert result["end"] - start == WINDOW_S * 1000
        assert result["count"] == expected[key, start] == sum(result["labels"].values())
        assert set(result["labels"]) <= set(LABELS)
        assert result["summary"].strip() and result["model"]
