"""An mkdocs hook: a public name without a docstring is a warning, so `mkdocs build --strict` fails.

mkdocstrings renders a name without a docstring as a bare signature and says
nothing; the API reference promises a sentence for every public name, its public
methods and its properties.
"""

from __future__ import annotations

import enum
import inspect
from typing import Any

from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("docstrings")


def _undocumented(package: Any) -> list[str]:
    missing = []
    for name in package.__all__:
        obj = getattr(package, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if not inspect.isclass(obj) or issubclass(obj, enum.Enum):
            continue
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            documented = bool((target.__doc__ or "").strip())
            if (inspect.isfunction(target) or isinstance(value, property)) and not documented:
                missing.append(f"{name}.{member}")
    return missing


def on_pre_build(config: Any) -> None:
    import recoverable_state

    for name in _undocumented(recoverable_state):
        log.warning("recoverable_state.%s has no docstring: the API reference needs one", name)
