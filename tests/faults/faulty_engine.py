"""`streamer run` whose engine model steps fail on purpose: the entry point of tests/faults/test_worker_faults.py.

Not product behaviour: nothing under streamer/ reads the variables below. Run as a script, this file
is re-imported as `__mp_main__` by multiprocessing's spawn in every engine worker process, so the
patch applies in the children, where the steps run:

- a step holding a token `STREAMER_TEST_POISON_ID` (the tiny tokenizer's unknown token, which only
  poisoned events produce) raises, every time, alone too: a persistently failing event;
- every `STREAMER_TEST_FAIL_EVERY`th step of two or more sequences raises once: a transient batch
  failure, which never hits a sequence running alone.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Sequence

import torch

from streamer.engine import paged

POISON_ID = int(os.environ["STREAMER_TEST_POISON_ID"])
FAIL_EVERY = int(os.environ["STREAMER_TEST_FAIL_EVERY"])

_real_step = paged.PagedRunner.step
_batches = itertools.count(1)


def _faulty_step(self: paged.PagedRunner, rows: Sequence[paged.Row]) -> torch.Tensor:
    if any(POISON_ID in row.tokens for row in rows):
        raise RuntimeError("poisoned input (injected fault)")
    if len(rows) > 1 and next(_batches) % FAIL_EVERY == 0:
        print("injected: transient batch failure", file=sys.stderr, flush=True)  # children log nothing else
        raise RuntimeError("transient batch failure (injected fault)")
    return _real_step(self, rows)


paged.PagedRunner.step = _faulty_step  # type: ignore[method-assign]

if __name__ == "__main__":
    from streamer.cli import app

    app()
