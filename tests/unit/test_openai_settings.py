"""engine.kind openai: what its settings demand, and that the backend loads no model library."""

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.config import Settings, load_settings
from streamer.errors import ConfigError


def test_kind_openai_needs_a_base_url_and_a_model(tmp_path: Path) -> None:
    path = tmp_path / "streamer.yaml"
    path.write_text("engine:\n  kind: openai\n  openai:\n    model: smollm2\n")
    with pytest.raises(ConfigError, match=r"engine.kind openai needs engine.openai.base_url"):
        load_settings(path)


def test_the_api_key_is_a_secret_and_the_bounds_are_ordered() -> None:
    settings = Settings(engine={"kind": "openai", "openai": {"base_url": "http://vllm:8000/v1", "model": "m",
                                                             "api_key": "sk-123"}})
    assert "sk-123" not in repr(settings) and "sk-123" not in settings.model_dump_json()
    with pytest.raises(ValueError, match="min_concurrency"):
        Settings(engine={"openai": {"min_concurrency": 9, "max_concurrency": 4}})


def test_the_openai_backend_loads_neither_torch_nor_transformers() -> None:
    probe = ("import sys, streamer.engine.openai; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
