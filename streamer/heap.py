"""The process's garbage collector, tuned once the model is resident.

A loaded model leaves millions of long-lived objects (torch's and transformers' modules, tensors'
Python wrappers, the tokenizer) that the cyclic collector walks again on every full collection. On the
window route that walk was 24% of consuming and 41% of closing (`bench/peers_windows.py`, py-spy).
Freezing what start-up built moves it out of the collector's sight for good (nothing of it is garbage
while the process runs), and a higher last threshold keeps full collections of what is left rare
(the service makes short-lived objects at a high rate, few of them in cycles; reference counting frees
them). Only process entry points call this: it changes the interpreter's state, so a library user
decides for their own process.
"""

from __future__ import annotations

import gc

# Generation 0 and 1 as CPython's defaults; a full collection after 100 generation-1 collections
# instead of 10 (the window route: 1.29x Quix Streams with this and the freeze, 1.21x with the freeze alone).
THRESHOLDS = (700, 10, 100)


def settle_heap() -> None:
    """Call once, after the model is loaded and before serving: collect start-up's garbage, freeze the rest."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
