"""Memorization-driven surgery: scores -> frozen plans -> ``apply`` -> report (STYLE.md).

Submodules: ``plan`` (plans from UnitMem / LayerMem / ΔLayerMem or any user score), ``prune``
(zeroing and structural pruning through Torch-Pruning), ``swap`` (layer swapping), ``evaluate``
(linear probe, kNN), ``finetune`` (selective fine-tuning), ``inject`` (unit injection check),
``scores`` (the scores file the CLI stages share).

Names are imported lazily (``prune`` pulls in Torch-Pruning), so ``import memsurgery.surgery``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # plans
    "UnitPlan": "plan", "LayerPlan": "plan", "Report": "plan", "plan_units": "plan", "plan_layers": "plan",
    "unit_scores_from_probe": "plan", "layer_scores_from_probe": "plan", "resolve_unit_layer": "plan",
    "default_protected": "plan", "UnitScoreMap": "plan", "LayerScoreMap": "plan",
    # pruning
    "zero_units_": "prune", "prune_structural_": "prune", "MemImportance": "prune", "replay_history": "prune",
    "group_scores": "prune", "coupled_layers": "prune",
    # swapping, evaluation, fine-tuning, injection, scores
    "swap_layers_": "swap",
    "extract_features": "evaluate", "linear_probe": "evaluate", "knn_accuracy": "evaluate",
    "evaluate_encoder": "evaluate",
    "select_layers": "finetune", "FinetuneConfig": "finetune", "FinetuneResult": "finetune", "finetune_": "finetune",
    "InjectConfig": "inject", "InjectionResult": "inject", "inject_unit": "inject", "inject_unit_": "inject",
    "ScoreSet": "scores",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
