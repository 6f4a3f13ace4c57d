"""The pipeline's stages speak to the model through `streamer.engine.backend` and its torch-free request
vocabulary, so handling events, windows and writes never loads a model library (a remote backend needs
none, and the simulation runs thousands of pipelines without one)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_event_handling_windows_and_the_writers_loads_no_model_library() -> None:
    probe = ("import sys, streamer.pipeline.events, streamer.pipeline.window_stage, streamer.pipeline.writer; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
