"""The pipeline's stages speak to the model through `streamer.engine.backend` and its torch-free request
vocabulary, so handling events, windows and writes never loads a model library (a remote backend needs
none, and the simulation runs thousands of pipelines without one)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import streamer.engine


def test_importing_event_handling_windows_and_the_writers_loads_no_model_library() -> None:
    probe = ("import sys, streamer.pipeline.events, streamer.pipeline.window_stage, streamer.pipeline.writer; "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports anywhere: at the top, in a function, or under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_pool_builder_and_the_engine_processes_do_not_import_each_other() -> None:
    """`processes` builds its children's engines with `sizing`; only `build` starts the processes."""
    engine = Path(streamer.engine.__file__).parent
    assert "streamer.engine.build" not in _imported_modules(engine / "processes.py")
    assert "streamer.engine.processes" in _imported_modules(engine / "build.py")
    assert not {"streamer.engine.build", "streamer.engine.processes"} & _imported_modules(engine / "continuous.py")
