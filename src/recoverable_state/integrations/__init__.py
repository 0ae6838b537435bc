"""Bridges to other frameworks, each behind an extra (`crawlee`: the `[crawlee]` extra)."""
