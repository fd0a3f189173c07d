"""Shared helpers of the framework adapters."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, pip_name: str, adapter: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{adapter} needs {pip_name!r}, which is not installed: pip install {pip_name}") from e


def prefixed(metrics: dict[str, float], prefix: str = "memsurgery/") -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()}
