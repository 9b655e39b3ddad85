"""The running build's version, from the installed package's metadata (standard library only)."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("edge-gateway")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
