"""The held-out evaluation set, written for this project: 200 prompts and paragraphs for perplexity.

It is never used for training (distillation or recovery take a corpus the user supplies).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files


@dataclass(frozen=True)
class EvalSet:
    prompts: tuple[str, ...]
    texts: tuple[str, ...]

    def limited(self, prompts: int) -> EvalSet:
        return EvalSet(self.prompts[:prompts], self.texts)


def load_eval_set() -> EvalSet:
    data = files("streamer.compress") / "data"
    prompts = tuple(line for line in (data / "prompts.txt").read_text().splitlines() if line.strip())
    texts = tuple(p.strip() for p in (data / "perplexity.txt").read_text().split("\n\n") if p.strip())
    return EvalSet(prompts, texts)
