"""What every command line of the project shares: one-line errors with status 2
(store.cli) and the installed version."""

from __future__ import annotations

from store.cli import Parser, fail

__all__ = ["Parser", "fail", "version"]


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("dissect-dist")
    except metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed: pip install -e .)"
