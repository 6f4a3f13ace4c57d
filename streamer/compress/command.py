"""`streamer compress`: turns command-line options into a run (or a report) and prints the tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from streamer.compress.distil import TrainOptions
from streamer.compress.errors import CompressError
from streamer.compress.gate import Bounds
from streamer.compress.pipeline import CompressOptions, compress, gate_error
from streamer.compress.report import comparison_table, report_table

GATE_EXIT = 3


def run_compress(
    sources: Sequence[Path],
    *,
    report: bool,
    recipes: Sequence[str],
    out: Path | None,
    train: TrainOptions,
    bounds: Bounds,
    threads: int | None = None,
    **options,
) -> None:
    """Print the comparison table(s); raises CompressError (or GateFailed) for the CLI to report."""
    console = Console()
    if report:
        console.print(report_table(list(sources)))
        return
    if len(sources) > 1:
        raise CompressError("give one SOURCE (a model directory) or none for the default model")
    if out is None:
        raise CompressError("--out DIR is required")
    if threads is not None:
        torch.set_num_threads(threads)
    if options.get("device", "auto") == "auto" and "int8-dynamic" in recipes:
        options["device"] = "cpu"  # its kernels are CPU kernels
    outcome = compress(
        sources[0] if sources else None,
        CompressOptions(recipes=list(recipes), out=out, train=train, bounds=bounds, **options),
    )
    manifest = outcome.manifest
    column = (f"{out.name}\n{manifest.recipe}", manifest.figures)
    console.print(comparison_table(outcome.source_name, manifest.source_figures, [column]))
    if not outcome.published:
        raise gate_error(manifest)
    note = " (gate failed, kept by --force)" if manifest.gate.forced else ""
    console.print(f"wrote {out}{note}", highlight=False)
