"""`streamer run` whose engine model steps fail on purpose: the entry point of tests/faults/test_worker_faults.py.

Not product behaviour: nothing under streamer/ reads the variables below. Run as a script, this file
is re-imported as `__mp_main__` by multiprocessing's spawn in every engine worker process, so the
patch applies in the children, where the steps run:

- a step holding a token `STREAMER_TEST_POISON_ID` (the tiny tokenizer's unknown token, which only
  poisoned events produce) raises, every time, alone too: a persistently failing event;
- every `STREAMER_TEST_FAIL_EVERY`th step of two or more sequences raises once: a transient batch
  failure, which never hits a sequence running alone;
- once the file `STREAMER_TEST_STALL` names exists, the first child to step claims it, writes its pid
  to `<file>.pid` and stalls in that step, so the test kills a process that surely holds requests
  (killed at a random moment, a child between steps may hold none, and the retry goes unexercised).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from streamer.engine import paged

POISON_ID = int(os.environ["STREAMER_TEST_POISON_ID"])
FAIL_EVERY = int(os.environ["STREAMER_TEST_FAIL_EVERY"])
STALL = Path(os.environ["STREAMER_TEST_STALL"])

_real_step = paged.PagedRunner.step
_batches = itertools.count(1)


def _stall_if_asked() -> None:
    if not STALL.exists():
        return
    try:
        claim = os.open(f"{STALL}.pid", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # another child stalls; this one goes on
    os.write(claim, str(os.getpid()).encode())
    os.close(claim)
    while True:
        time.sleep(1)  # until SIGKILL


def _faulty_step(self: paged.PagedRunner, rows: Sequence[paged.Row]) -> torch.Tensor:
    _stall_if_asked()
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
