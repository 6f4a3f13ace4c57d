"""The artifact's `manifest.json`: what was done to which source, and what it measured.

A loader needs nothing else to rebuild the model: the recipe steps say which modules to rebuild
(low-rank factors) and what to re-apply after loading (dynamic quantization, GPU quantization).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class Step(BaseModel):
    """One recipe step as run, with the options it used and what a loader must know to rebuild it."""

    recipe: str
    options: dict[str, Any] = Field(default_factory=dict)
    structure: dict[str, Any] = Field(default_factory=dict, description="e.g. low-rank ranks per module")


class Figures(BaseModel):
    """One model's measured size, speed and quality; quality is None for the source against itself."""

    params: int
    disk_bytes: int
    resident_bytes: int
    tokens_per_s_b1: float
    tokens_per_s_b32: float
    perplexity: float
    agreement: float | None = None


class GateOutcome(BaseModel):
    max_ppl_ratio: float
    min_agreement: float
    passed: bool
    forced: bool
    reasons: list[str] = Field(default_factory=list)


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    source: str
    source_sha256: str
    steps: list[Step]
    weights: str = Field(description="the weights file: model.safetensors (float, or int8 weights with their scales)")
    source_figures: Figures | None = None
    figures: Figures | None = None
    gate: GateOutcome | None = None
    versions: dict[str, str] = Field(default_factory=dict)

    @property
    def recipe(self) -> str:
        return "+".join(step.recipe for step in self.steps)

    def step(self, recipe: str) -> Step | None:
        return next((s for s in self.steps if s.recipe == recipe), None)

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((Path(directory) / MANIFEST).read_text())


def has_manifest(directory: Path) -> bool:
    return (Path(directory) / MANIFEST).is_file()


def weights_sha256(directory: Path) -> str:
    """Hash of the source's weight files (sorted by name), so an artifact names exactly what it came from."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()
