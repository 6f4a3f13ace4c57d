"""The issue's CPU targets for `streamer compress` on SmolLM2-135M, each recipe measured side by side
with the source in its own run, then all artifacts in one report and a targets table.

Run: .venv/bin/python -m bench.compress [--out-dir DIR] [--eval-prompts 200] [--steps 20] [--only NAME ...]
Training texts for distillation and recovery: Python's own documentation topics (`pydoc_data`, shipped
with CPython), disjoint from the evaluation set in streamer/compress/data.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from streamer.compress.distil import TrainOptions
from streamer.compress.gate import Bounds
from streamer.compress.manifest import Manifest
from streamer.compress.pipeline import CompressOptions, compress
from streamer.compress.report import report_table

NO_GATE = Bounds(max_ppl_ratio=1e9, min_agreement=0.0)  # record every figure, pass or miss


def pydoc_corpus(path: Path) -> Path:
    from pydoc_data.topics import topics

    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in topics.values()))
    return path


def runs(corpus: Path, train: TrainOptions) -> dict[str, dict]:
    steps = train.steps
    return {
        "int8-dynamic": {"recipes": ["int8-dynamic"]},
        "lowrank-70": {"recipes": ["lowrank"], "target_params": 0.7, "recover_steps": steps, "corpus": corpus,
                       "train": train},
        "distil-half": {"recipes": ["distil"], "keep_layers": 0.5, "corpus": corpus, "train": train},
    }  # fmt: skip


def load() -> str:
    """The 1/5/15-minute load averages: on a shared machine, what the speed ratios were measured under."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def targets(manifests: dict[str, Manifest]) -> Table:
    """Each target of the issue against the measured ratio, with the margin it is met or missed by."""
    table = Table(title="issue 5 targets (CPU, SmolLM2-135M)")
    for column in ("target", "bound", "measured", "verdict"):
        table.add_column(column)

    def row(name: str, value: float, bound: float, at_least: bool) -> None:
        met = value >= bound if at_least else value <= bound
        table.add_row(name, f"{'>=' if at_least else '<='} {bound:g}", f"{value:.3f}",
                      "met" if met else f"missed by {abs(value - bound):.3f}")  # fmt: skip

    if (q := manifests.get("int8-dynamic")) is not None:
        row("int8 tok/s b1 / fp32", q.figures.tokens_per_s_b1 / q.source_figures.tokens_per_s_b1, 1.5, True)
        row("int8 resident / fp32", q.figures.resident_bytes / q.source_figures.resident_bytes, 0.35, False)
        row("int8 greedy agreement", q.figures.agreement, 0.90, True)
    if (lr := manifests.get("lowrank-70")) is not None:
        row("low-rank params / source", lr.figures.params / lr.source_figures.params, 0.70, False)
        row("low-rank ppl / source", lr.figures.perplexity / lr.source_figures.perplexity, 1.15, False)
    if (d := manifests.get("distil-half")) is not None:
        row("student ppl / teacher", d.figures.perplexity / d.source_figures.perplexity, 1.30, False)
        row("student tok/s b1 / teacher", d.figures.tokens_per_s_b1 / d.source_figures.tokens_per_s_b1, 1.7, True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="distillation and recovery steps")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="run only these of the runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="compress-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = pydoc_corpus(out_dir / "pydoc-corpus.jsonl")
    console = Console()
    manifests = {}
    train = TrainOptions(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr)
    for name, spec in runs(corpus, train).items():
        if args.only and name not in args.only:
            continue
        out = out_dir / name
        if not (out / "manifest.json").is_file():
            console.print(f"[bold]{name}[/] (load average {load()})")
            options = CompressOptions(out=out, bounds=NO_GATE, eval_prompts=args.eval_prompts, device="cpu", **spec)
            compress(None, options)
            console.print(f"{name} done (load average {load()})")
        manifests[name] = Manifest.read(out)
    console.print(report_table([out_dir / name for name in manifests]))
    console.print(targets(manifests))
    console.print(f"artifacts in {out_dir}")


if __name__ == "__main__":
    main()
