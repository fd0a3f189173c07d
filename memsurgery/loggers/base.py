"""The logger seam, in the style of accelerate's ``GeneralTracker`` / ``register_tracker_class``.

A backend subclasses :class:`ProbeLogger`, sets ``name`` and implements :meth:`ProbeLogger.log`
(one :class:`~memsurgery.loggers.record.ProbeRecord` per probe) and, when it holds resources,
:meth:`ProbeLogger.finish`. It is registered with :func:`register_logger` and then named in
``Monitor(loggers=["my_backend"])``. Loggers run on rank 0 only (``main_process_only``); they
never import the monitor or the probe runner. The built-in backends register themselves when
``memsurgery.loggers`` is imported (its ``__init__`` imports each; importing any of its modules
runs it first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .record import ProbeRecord

L = TypeVar("L", bound="type[ProbeLogger]")


class ProbeLogger:
    """Base class of the memsurgery loggers.

    Attributes:
        name: the registered name (``"tensorboard"``, ``"jsonl"``, ...).
        requires_logging_directory: a name alone builds it with ``log_dir`` (``Monitor(log_dir=...)``).
        main_process_only: called on rank 0 only (all built-in loggers).

    Example:
        >>> @register_logger
        ... class PrintLogger(ProbeLogger):
        ...     name = "print"
        ...     def log(self, record):
        ...         print(record.step, record.scalars.get("layermem/conv8"))
        >>> mon = Monitor(f, probe, reference=g, loggers=["print"])
    """

    name: str = ""
    requires_logging_directory: bool = False
    main_process_only: bool = True

    def log(self, record: ProbeRecord) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until everything logged so far is written (figures drawn in the background)."""
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.drain()

    def finish(self) -> None:
        """Flush and release what the logger holds (called by ``Monitor.close``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_REGISTRY: dict[str, type[ProbeLogger]] = {}


def register_logger(cls: L) -> L:
    """Register a :class:`ProbeLogger` subclass under its ``name`` (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, ProbeLogger)):
        raise TypeError(f"register_logger takes a ProbeLogger subclass, got {cls!r}")
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name (class attribute `name = \"...\"`) to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a logger named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def logger_names() -> list[str]:
    return sorted(_REGISTRY)


def build_loggers(loggers: Any, log_dir: str | os.PathLike[str] | None) -> list[ProbeLogger]:
    """ProbeLogger instances from ``Monitor(loggers=..., log_dir=...)``: instances as they are,
    registered names built with ``log_dir`` (a sub-folder per backend when there are several).
    ``log_dir`` alone means the TensorBoard logger. Raises before any training starts."""
    if loggers is None:
        items: Sequence[Any] = []
    elif isinstance(loggers, (str, ProbeLogger)):
        items = [loggers]
    elif isinstance(loggers, Sequence):
        items = list(loggers)
    else:
        raise TypeError(f"loggers must be a logger name, a ProbeLogger or a list of them, got {type(loggers).__name__}")
    names = [x for x in items if isinstance(x, str)]
    if log_dir is not None and not items:
        names, items = ["tensorboard"], ["tensorboard"]
    out: list[ProbeLogger] = []
    for x in items:
        if isinstance(x, ProbeLogger):
            out.append(x)
            continue
        if not isinstance(x, str):
            raise TypeError(f"a logger must be a name ({', '.join(logger_names())}) or a ProbeLogger, got {type(x).__name__}")
        if x not in _REGISTRY:
            import difflib

            close = difflib.get_close_matches(x, list(_REGISTRY), n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"unknown logger {x!r}.{hint} Registered: {', '.join(logger_names())}")
        cls = _REGISTRY[x]
        if cls.requires_logging_directory:
            if log_dir is None:
                raise ValueError(f"the {x!r} logger writes files: give Monitor(log_dir=...) (or a {cls.__name__} instance)")
            folder = os.fspath(log_dir) if len(names) == 1 else os.path.join(os.fspath(log_dir), x)
            out.append(cls(folder))  # type: ignore[call-arg]
        else:
            out.append(cls())
    return out


def dispatch(loggers: Sequence[ProbeLogger], record: ProbeRecord | Callable[[], ProbeRecord], rank: int) -> None:
    """Hand ``record`` to every logger (rank 0 only, for ``main_process_only`` loggers)."""
    live = [lg for lg in loggers if rank == 0 or not lg.main_process_only]
    if not live:
        return
    rec = record() if callable(record) else record
    for lg in live:
        lg.log(rec)
