"""`streamer compress` on the real SmolLM2: the artifact a run writes is served by a worker through a
real Kafka broker and redis-server, its manifest holds the figures the command printed, and the
quality gate refuses (and `--force` keeps) a model outside the bounds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from streamer.compress.manifest import Manifest
from streamer.compress.report import cells
from streamer.config import ModelSettings
from streamer.engine.build import resident
from streamer.engine.load import load_worker
from streamer.pipeline.app import connect
from tests.integration.services import consume_all, produce_lines, unique_name
from tests.integration.test_pipeline import question, run_until_written, settings_for
from tests.tiny import save_tiny_llama

# Each compress run measures two models on 2 shared cores: minutes, not seconds.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

QUESTIONS = 12
FAST_EVAL = ["--eval-prompts", "16", "--threads", "2"]
# The CPU recipe a user would serve (int8 weights and activations), through the default engine; the
# default quality gate applies.
SERVED = ["--recipe", "int8-dynamic"]


def streamer_compress(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "streamer", "compress", *args, *FAST_EVAL],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compress") / "smol-int8"
    done = streamer_compress(*SERVED, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_the_manifest_holds_the_figures_the_command_printed(artifact):
    out, printed = artifact
    manifest = Manifest.read(out)

    assert manifest.recipe == "int8-dynamic" and manifest.gate.passed
    for cell in cells(manifest.source_figures, None) + cells(manifest.figures, manifest.source_figures):
        if cell != "—":
            assert cell in printed
    assert manifest.figures.resident_bytes < 0.4 * manifest.source_figures.resident_bytes


def test_a_worker_loads_the_artifact_by_path_and_answers_through_kafka(artifact, kafka_bootstrap, redis_url):
    out, _ = artifact
    worker = load_worker(ModelSettings(path=out, device="cpu"))
    assert worker.name == "smol-int8 (int8-dynamic of SmolLM2-135M-Instruct)"
    assert worker.loaded.manifest["figures"] == Manifest.read(out).figures.model_dump()

    tag = unique_name("compress")
    settings = settings_for(kafka_bootstrap, redis_url, tag)
    produce_lines(kafka_bootstrap, settings.routes[0].input, [question(i) for i in range(QUESTIONS)])
    pipeline = connect(settings, kafka_bootstrap, redis_url, resident(worker, settings))
    asyncio.run(run_until_written(pipeline, QUESTIONS, timeout_s=300))

    letters = consume_all(kafka_bootstrap, settings.kafka.dead_letter_topic, 1, timeout_s=5)
    assert not letters, letters[0].value[:500]
    answers = [
        orjson.loads(m.value) for m in consume_all(kafka_bootstrap, settings.routes[0].output, QUESTIONS, timeout_s=120)
    ]
    assert sorted(a["id"] for a in answers) == [f"q-{i:03d}" for i in range(QUESTIONS)]
    assert all(a["output"] and a["model"] == worker.name for a in answers)
    metric = pipeline.metrics.registry.get_sample_value
    assert metric("streamer_model_info", {"name": worker.name, "recipe": "int8-dynamic",
                                          "source": "SmolLM2-135M-Instruct",
                                          "source_sha256": worker.loaded.manifest["source_sha256"]}) == 1
    agreement = metric("streamer_model_figure", {"figure": "agreement", "of": "model"})
    assert agreement == worker.loaded.manifest["figures"]["agreement"]


def test_the_quality_gate_fails_the_command_unless_forced(tmp_path):
    tiny = save_tiny_llama(tmp_path / "tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           max_position_embeddings=2048)  # the gate's rule, not the model, is under test
    impossible = [str(tiny), "--recipe", "prune-magnitude", "--sparsity", "0.3", "--min-agreement", "1.01"]

    refused = streamer_compress(*impossible, "--out", str(tmp_path / "refused"))
    forced = streamer_compress(*impossible, "--out", str(tmp_path / "forced"), "--force")

    assert refused.returncode == 3
    assert "quality gate failed" in refused.stderr and "below 101%" in refused.stderr
    assert not (tmp_path / "refused").exists()
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert Manifest.read(tmp_path / "forced").gate.forced


def test_distillation_trains_on_the_events_recorded_in_a_topic(kafka_bootstrap, tmp_path):
    topic = unique_name("corpus")
    events = [orjson.dumps({"id": f"e-{i}", "text": f"event {i}: the quick brown fox jumps over the lazy dog."})
              for i in range(30)]  # fmt: skip
    produce_lines(kafka_bootstrap, topic, [*events, b"not json", orjson.dumps({"id": "no-text"})])
    tiny = save_tiny_llama(tmp_path / "tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           max_position_embeddings=2048)  # fmt: skip

    done = streamer_compress(
        str(tiny), "--recipe", "distil", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
        "--corpus-topic", topic, "--bootstrap", kafka_bootstrap, "--max-ppl-ratio", "1e9", "--min-agreement", "0",
        "--out", str(tmp_path / "student"),
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    step = Manifest.read(tmp_path / "student").steps[0]
    assert step.options["corpus"] == f"kafka topic {topic}" and len(step.structure["kept_layers"]) == 2
