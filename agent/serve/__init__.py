"""Serving: the running agent (hot swap, metrics) and its local HTTP API."""
