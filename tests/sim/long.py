"""`make test-sim`: the simulation with fresh random seeds until a time budget is spent.

Each round runs both modes (event time, wall clock) under one seed with every fault rule. A failing
round prints its seed and hypothesis's minimal failing sequence; rerun one seed with `--seed N`.
Exits 1 if any round failed. PYTHONHASHSEED is fixed by the Makefile, so a seed replays exactly.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback

from hypothesis import HealthCheck, seed, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.sim.machine import FAULTS, Simulation, quiet_logs

ROUND = settings(max_examples=200, stateful_step_count=100, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


def run_seed(value: int) -> list[str]:
    """The modes that failed under this seed (each failure printed)."""
    failed = []
    for wall_clock in (False, True):
        machine = seed(value)(Simulation.only(*FAULTS, wall_clock=wall_clock))
        try:
            with quiet_logs():
                run_state_machine_as_test(machine, settings=ROUND)
        except Exception:  # a failure hypothesis found and shrank: report it, go on with the next seed
            mode = "wall clock" if wall_clock else "event time"
            print(f"\nFAILED: seed {value}, {mode}:\n{traceback.format_exc()}", flush=True)
            failed.append(mode)
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, help="run this one seed")
    args = parser.parse_args()
    seeds = [args.seed] if args.seed is not None else None
    deadline = time.monotonic() + args.minutes * 60
    failures: dict[int, list[str]] = {}
    rounds = 0
    while (seeds is None and time.monotonic() < deadline) or (seeds and rounds < len(seeds)):
        value = seeds[rounds] if seeds else random.randrange(2**32)
        rounds += 1
        print(f"round {rounds}: seed {value}", flush=True)
        if failed := run_seed(value):
            failures[value] = failed
    print(f"\n{rounds} rounds of {2 * ROUND.max_examples} runs; failing seeds: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
