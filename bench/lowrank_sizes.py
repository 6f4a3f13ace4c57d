"""Where low-rank factorization stops paying on SmolLM2-135M: perplexity and greedy agreement against
the source at several parameter budgets, without recovery training, all in one run.

Run: .venv/bin/python -m bench.lowrank_sizes [--fractions 0.95 0.9 0.85 0.8 0.75 0.7] [--eval-prompts 48]
Calibration text: Python's documentation topics, as `streamer compress` uses without --corpus.
"""

import argparse
import copy

from rich.console import Console
from rich.table import Table

from streamer.compress import corpus, lowrank, measure
from streamer.compress.evalset import load_eval_set
from streamer.models.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.95, 0.9, 0.85, 0.8, 0.75, 0.7])
    parser.add_argument("--eval-prompts", type=int, default=48)
    args = parser.parse_args()
    loaded = load_model(None, device="cpu")
    source, tokenizer = loaded.model, loaded.tokenizer
    evalset = load_eval_set().limited(args.eval_prompts)
    calibration = lowrank.calibration_ids(tokenizer, corpus.default_texts())
    reference = measure.reference(source, tokenizer, evalset.prompts)
    source_ppl, source_params = measure.perplexity(source, tokenizer, evalset.texts), measure.parameter_count(source)
    table = Table(title=f"low-rank without recovery (source perplexity {source_ppl:.2f}, {args.eval_prompts} prompts)")
    for column in ("target", "parameters", "perplexity", "ratio", "agreement"):
        table.add_column(column, justify="right")
    for fraction in args.fractions:
        model = copy.deepcopy(source)
        lowrank.factorize(model, target_fraction=fraction, calibration=calibration)
        ppl = measure.perplexity(model, tokenizer, evalset.texts)
        table.add_row(f"{fraction:.2f}", f"{measure.parameter_count(model) / source_params:.3f}x", f"{ppl:.2f}",
                      f"{ppl / source_ppl:.2f}x", f"{measure.agreement(model, tokenizer, reference):.1%}")
        Console().print(f"{fraction}: perplexity {ppl:.2f}", highlight=False)
    Console().print(table)


if __name__ == "__main__":
    main()
