"""The package version, as installed (pyproject.toml), for /version, the demo cache key and the User-Agent."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("plm-serve")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0.0.0+source"
