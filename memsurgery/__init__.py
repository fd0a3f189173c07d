"""memsurgery: locate where a vision encoder memorizes its training data, and act on it.

Heavy optional libraries (tensorboard, torch_pruning, timm, accelerate) are imported lazily,
where they are used, so ``import memsurgery`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("memsurgery")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "metrics": "memsurgery.metrics",
    "capture": "memsurgery.capture",
    "models": "memsurgery.models",
    "views": "memsurgery.views",
    "probe": "memsurgery.probe",
    "data": "memsurgery.data",
    "ProbeConfig": "memsurgery.probe",
    "ProbeResult": "memsurgery.probe",
    "run_probe": "memsurgery.probe",
    "ViewConfig": "memsurgery.views",
    "Monitor": "memsurgery.monitor",
    "ProbeSet": "memsurgery.probe_data",
    "ProbeImages": "memsurgery.probe_data",
    "CustomViews": "memsurgery.custom_views",
    "Lockstep": "memsurgery.twin",
    "TwinRun": "memsurgery.twin",
    "Reference": "memsurgery.checkpoints",
    "load_weights": "memsurgery.checkpoints",
    "twin_split": "memsurgery.data",
    "TwinSplit": "memsurgery.data",
    "LayerNames": "memsurgery.families",
    "families": "memsurgery.families",
    "monitor": "memsurgery.monitor",
    "train": "memsurgery.train",
    "objectives": "memsurgery.objectives",
    "surgery": "memsurgery.surgery",
    "export": "memsurgery.export",
    "save_model": "memsurgery.export",
    "load_model": "memsurgery.export",
    "regularize": "memsurgery.regularize",
    "AlignmentRegularizer": "memsurgery.regularize",
    "alignment_penalty": "memsurgery.regularize",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if _LAZY[name].endswith(name) else getattr(module, name)
    raise AttributeError(f"module 'memsurgery' has no attribute {name!r}")
