"""The recipe application: ``memsurgery run <recipe.yaml>`` and the stages the CLI runs one by one.

The library (probe, monitor, metrics, surgery, export, loggers, trainer) never imports this
package; it imports the library. Its modules, each importing only the ones above it:

- :mod:`~memsurgery.recipe.schema`: :class:`RunConfig` and its sections, the YAML loading;
- :mod:`~memsurgery.recipe.folder`: :class:`RunFolder`, the run folder's files and provenance;
- :mod:`~memsurgery.recipe.setup`: data, twin encoders, evaluation split, the recipe's digest;
- :mod:`~memsurgery.recipe.summary`: ``summary.md`` and ``report.md``;
- :mod:`~memsurgery.recipe.stages`: the stage registry (:data:`STAGES`) and the stages;
- :mod:`~memsurgery.recipe.run`: :func:`load_recipe`, :func:`check_recipe`, :func:`run_recipe`;
- :mod:`~memsurgery.recipe.sweep`: ``sweep:`` recipes, one table over values and seeds (:func:`run_sweep`).
"""

from __future__ import annotations

from .folder import RunFolder
from .run import check_recipe, load_recipe, run_recipe
from .schema import (
    ConfigError,
    DataConfig,
    EvalConfig,
    FinetuneStageConfig,
    ModelConfig,
    MonitorConfig,
    PruneConfig,
    RunConfig,
    SplitConfig,
    SurgeryConfig,
    SwapConfig,
    SweepConfig,
    from_dict,
    load_yaml,
)
from .setup import Evaluator, build_twins, load_data, recipe_digest
from .stages import STAGES, Stage, run_stage
from .summary import format_summary
from .sweep import run_sweep, sweep_variants

__all__ = ["STAGES", "ConfigError", "DataConfig", "EvalConfig", "Evaluator", "FinetuneStageConfig", "ModelConfig",
           "MonitorConfig", "PruneConfig", "RunConfig", "RunFolder", "SplitConfig", "Stage", "SurgeryConfig",
           "SwapConfig", "SweepConfig", "build_twins", "check_recipe", "format_summary", "from_dict", "load_data", "load_recipe",
           "load_yaml", "recipe_digest", "run_recipe", "run_stage", "run_sweep",
           "sweep_variants"]
