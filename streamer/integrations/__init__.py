"""Glue for calling streamer's batched pool from other stream frameworks (each an optional extra)."""
