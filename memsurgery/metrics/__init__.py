"""Pure memorization metrics over tensors (METRICS.md). No model, hook or monitor needed."""

from .distance import DISTANCES, flatten_normalize, pair_distance
from .layer import delta_layermem, layermem, sslmem
from .registry import get_metric, list_metrics, register_metric
from .stats import TestResult, kendall_tau, topk_indices, topk_overlap, ttest_greater
from .streaming import AlignmentAccumulator, ClassMemAccumulator, UnitMemAccumulator
from .unit import UnitScores, classmem, unitmem

__all__ = [
    "DISTANCES",
    "AlignmentAccumulator",
    "ClassMemAccumulator",
    "TestResult",
    "UnitMemAccumulator",
    "UnitScores",
    "classmem",
    "delta_layermem",
    "flatten_normalize",
    "get_metric",
    "kendall_tau",
    "layermem",
    "list_metrics",
    "pair_distance",
    "register_metric",
    "sslmem",
    "topk_indices",
    "topk_overlap",
    "ttest_greater",
    "unitmem",
]
