"""The collector after start-up (streamer.heap): run in a fresh interpreter, since it changes process state."""

import subprocess
import sys

PROBE = """
import gc
junk = [[i] for i in range(50_000)]  # start-up's long-lived objects (a model's, say)
before = gc.get_threshold()
from streamer.heap import THRESHOLDS, settle_heap
settle_heap()
print(gc.get_freeze_count() >= 50_000, gc.get_threshold() == THRESHOLDS, THRESHOLDS[2] > before[2],
      gc.get_count()[0] < 100)
"""


def test_settle_heap_freezes_what_start_up_built_and_makes_full_collections_rarer() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)

    assert done.stdout.split() == ["True", "True", "True", "True"]
