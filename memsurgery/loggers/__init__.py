"""Where the probes go: one :class:`ProbeRecord` per probe, handed to each logger on rank 0.

Built-in backends (each one file): :class:`TensorBoardLogger` (``"tensorboard"``),
:class:`JsonLinesLogger` (``"jsonl"``), :class:`WandbLogger` (``"wandb"``), :class:`MLflowLogger`
(``"mlflow"``) and :class:`AccelerateLogger` (an ``Accelerator``'s trackers). A new backend is a
:class:`ProbeLogger` subclass registered with :func:`register_logger`. See docs/logging.md.
"""

from __future__ import annotations

from .accelerate import AccelerateLogger
from .base import ProbeLogger, build_loggers, logger_names, register_logger
from .jsonl import JsonLinesLogger, read_jsonl
from .mlflow import MLflowLogger
from .record import FAMILIES, PointCard, ProbeRecord, chart_tag, metric_key
from .tensorboard import TensorBoardLogger
from .wandb import WandbLogger

__all__ = ["FAMILIES", "AccelerateLogger", "JsonLinesLogger", "MLflowLogger", "PointCard", "ProbeLogger", "ProbeRecord",
           "TensorBoardLogger", "WandbLogger", "build_loggers", "chart_tag", "logger_names", "metric_key", "read_jsonl", "register_logger"]
