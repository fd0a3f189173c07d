"""The metric registry: ``@register_metric(name)``, ``list_metrics()``, ``get_metric(name)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._registry import Registry

_METRICS: Registry[Callable[..., Any]] = Registry("metric")

register_metric = _METRICS.register
list_metrics = _METRICS.names
get_metric = _METRICS.get
