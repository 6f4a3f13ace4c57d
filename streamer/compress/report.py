"""Tables of measured figures: one compressed model against its source, or several side by side."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from rich.table import Table

from streamer.compress.errors import CompressError
from streamer.compress.manifest import Figures, Manifest, has_manifest

ROWS: list[tuple[str, str, Callable[[float], str]]] = [
    ("parameters", "params", lambda v: f"{v / 1e6:.1f}M"),
    ("bytes on disk", "disk_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
    ("bytes resident", "resident_bytes", lambda v: f"{v / 2**20:.1f} MiB"),
    ("tokens/s, batch 1", "tokens_per_s_b1", lambda v: f"{v:.1f}"),
    ("tokens/s, batch 32", "tokens_per_s_b32", lambda v: f"{v:.1f}"),
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("greedy agreement", "agreement", lambda v: f"{v:.1%}"),
]


def cells(figures: Figures, source: Figures | None) -> list[str]:
    """Each figure formatted, with its ratio to the source's where there is one."""
    out = []
    for _, field, fmt in ROWS:
        value = getattr(figures, field)
        if value is None:
            out.append("—")
            continue
        base = getattr(source, field) if source is not None else None
        ratio = f" ({value / base:.2f}x)" if base and field != "agreement" else ""
        out.append(fmt(value) + ratio)
    return out


def comparison_table(source_name: str, source: Figures, columns: Sequence[tuple[str, Figures]]) -> Table:
    table = Table(title="compression, measured side by side in one run")
    table.add_column("")
    table.add_column(source_name, justify="right")
    for name, _ in columns:
        table.add_column(name, justify="right")
    source_cells = cells(source, None)
    column_cells = [cells(figures, source) for _, figures in columns]
    for row, (label, _, _) in enumerate(ROWS):
        table.add_row(label, source_cells[row], *(c[row] for c in column_cells))
    return table


def artifact_dirs(paths: Sequence[Path]) -> list[Path]:
    """The artifact directories given, or those directly inside a given parent directory."""
    found = []
    for path in paths:
        if has_manifest(path):
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if has_manifest(p)))
    if not found:
        raise CompressError("no artifact (a directory with manifest.json) found in " + ", ".join(map(str, paths)))
    return found


def report_table(paths: Sequence[Path]) -> Table:
    """Several artifacts' manifests side by side against the source figures of the first one."""
    manifests = [(p, Manifest.read(p)) for p in artifact_dirs(paths)]
    first = manifests[0][1]
    if first.source_figures is None:
        raise CompressError(f"{manifests[0][0]} has no measured figures")
    columns = [(f"{p.name}\n{m.recipe}", m.figures) for p, m in manifests if m.figures is not None]
    return comparison_table(Path(first.source).name or first.source, first.source_figures, columns)
