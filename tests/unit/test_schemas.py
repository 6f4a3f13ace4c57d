"""The JSON Schemas in schemas/ are generated from the models; regenerate with `streamer schemas`."""

from pathlib import Path

from streamer.cli import render_schemas

SCHEMAS = Path(__file__).parents[2] / "schemas"


def test_schema_files_match_the_models():
    for name, text in render_schemas().items():
        path = SCHEMAS / f"{name}.json"
        assert path.exists(), f"{path} is missing: run `streamer schemas`"
        assert path.read_text() == text, f"{path} drifted from the model: run `streamer schemas`"
