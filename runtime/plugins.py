"""How the packages above the runtime extend it without the runtime naming them: entry-point
groups (pyproject.toml), `llamaonnx.commands` for subcommands and `llamaonnx.bench_engines` for
benchmark engines. Read from the installed metadata or, in a source checkout run without
installing (python -m runtime.cli, as tests/gpu/run.sh does), from pyproject.toml itself."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path


def declared(group: str) -> dict[str, str]:
    """name → "module:attribute" for every entry point of `group`."""
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
    return found or _declared_in_source(group)


def _declared_in_source(group: str) -> dict[str, str]:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        table = tomllib.loads(pyproject.read_text())
    except (ImportError, OSError, ValueError):  # Python 3.10, or no source tree
        return {}
    return dict(table.get("project", {}).get("entry-points", {}).get(group, {}))


def load(target: str):
    """The object a "module:attribute" target names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
