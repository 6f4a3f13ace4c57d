"""Glue for calling streamer's micro-batched pool from other stream frameworks (each an optional extra)."""
