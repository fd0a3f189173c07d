"""A small explicit registry of metric functions (timm's ``@register_model`` style)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_METRICS: dict[str, Callable[..., Any]] = {}


def register_metric(name: str) -> Callable[[F], F]:
    """Register ``fn`` under ``name``; a second registration of the same name raises."""

    def deco(fn: F) -> F:
        if name in _METRICS:
            raise ValueError(
                f"a metric named {name!r} is already registered ({_METRICS[name].__module__}."
                f"{_METRICS[name].__qualname__}); pick another name"
            )
        _METRICS[name] = fn
        return fn

    return deco


def list_metrics() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(_METRICS)


def get_metric(name: str) -> Callable[..., Any]:
    """The metric function registered under ``name``."""
    try:
        return _METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; registered: {', '.join(list_metrics())}") from None
