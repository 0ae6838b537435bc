"""The `recoverable-state` command line: look into and manage stored records.

Needs the `cli` extra (typer, rich): `pip install 'recoverable-state[cli]'`.
Run it as `recoverable-state --help` or `python -m recoverable_state.cli --help`.
"""

from ._app import app, main

__all__ = ["app", "main"]
