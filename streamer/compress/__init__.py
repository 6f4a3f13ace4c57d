"""Model compression: quantize, prune, factorize and distil a model into a self-describing artifact.

Each recipe is a module of its own; `pipeline` composes them, `measure` compares the result with the
source in the same run, `gate` decides whether it is good enough, and `artifact` writes and reloads it.
"""
