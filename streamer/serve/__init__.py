"""Serving the model over HTTP: an OpenAI-compatible API (`streamer.serve.openai`)."""
