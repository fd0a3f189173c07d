"""Memorization-driven surgery: scores -> frozen plans -> ``apply`` -> report (STYLE.md).

Submodules: ``plan`` (plans from UnitMem / LayerMem / ΔLayerMem or any user score), ``prune``
(zeroing and structural pruning through Torch-Pruning), ``swap`` (layer swapping), ``evaluate``
(linear probe, kNN), ``finetune`` (selective fine-tuning), ``inject`` (unit injection check).
"""
