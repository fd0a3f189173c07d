"""``memsurgery run <recipe.yaml>``: train twin encoders with the monitor on, then the stages.

A recipe maps onto :class:`~memsurgery.recipe.schema.RunConfig`. The twin setup (METRICS.md §1):
f trains on shared + candidates, g on shared + independent, in lockstep with the same seed and
hyper-parameters. The monitor probes on a schedule (LayerMem / ΔLayerMem / UnitMem / ClassMem on
the candidates, final-layer SSLMem' on every split) and writes TensorBoard logs under
``<output>/tb``. Everything a recipe asks for is checked before the first training step: the
schema when it loads (:func:`load_recipe`), the stage list against the registry
(:func:`check_recipe`), then the model, the layers, the split sizes and each listed stage's plan
on the built (untrained) model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_text, write_json
from ..data import twin_split
from ..monitor import Monitor, ProbeSet
from ..surgery.scores import ScoreSet
from ..train import train_twins
from .folder import RunFolder
from .schema import ConfigError, RunConfig, from_dict, load_yaml
from .setup import build_twins, load_data, recipe_digest, recipe_fingerprint, save_trained
from .stages import STAGES, Preflight, get_stage, run_stage, section
from .summary import format_summary, summarize


def load_recipe(path: str | Path) -> RunConfig:
    """Read a YAML recipe (``extends:`` resolved) into a checked :class:`RunConfig`."""
    cfg = from_dict(RunConfig, load_yaml(path))
    check_recipe(cfg)
    return cfg


def check_recipe(cfg: RunConfig) -> None:
    """What the schema alone cannot check: ``surgery.stages`` names registered stages, once each,
    in the registry's order, and each listed stage has its section. Raises :class:`ConfigError`."""
    listed = cfg.surgery.stages
    try:
        stages = [get_stage(s) for s in listed]
        for s in stages:
            if s.section is not None:
                section(cfg, s.section)
    except ValueError as e:
        raise ConfigError(f"surgery.stages: {e}") from e
    order = list(STAGES)
    wanted = sorted(dict.fromkeys(listed), key=order.index)
    if list(listed) != wanted:
        raise ConfigError(f"surgery.stages: {list(listed)} is not in pipeline order ({' -> '.join(order)}) or names a "
                          f"stage twice; write {wanted}")


def run_recipe(cfg: RunConfig, progress: bool = True, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run the recipe; writes ``summary.json``, ``summary.md`` and TensorBoard logs under ``cfg.output``,
    the trained twins (``f.safetensors``, ``g.safetensors``), the split and the candidates' scores,
    then the surgery stages the recipe lists (``surgery.stages``; see :mod:`memsurgery.recipe.stages`).

    With ``train.checkpoint_every`` set, checkpoints go to ``<output>/checkpoints`` (accelerate
    ``save_state`` plus ``memsurgery_state.json``, the monitor included); ``resume=True`` continues
    from the newest complete one, and refuses one made under another recipe unless ``force``."""
    check_recipe(cfg)
    if cfg.sweep is not None:
        raise ConfigError("this recipe has a 'sweep' section: run it with memsurgery.recipe.sweep.run_sweep "
                          "(or `memsurgery run`), which runs one recipe per value and seed")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    images, labels = load_data(cfg.data, progress)
    s = cfg.split
    split = twin_split(len(images), s.shared, s.candidates, s.independent, s.extra, seed=s.seed)
    f, g = build_twins(cfg, images)
    probe = ProbeSet.from_split(images, split, labels=labels, max_points=cfg.monitor.max_points, seed=s.seed)
    steps_per_epoch = split.train_f.numel() // cfg.train.batch_size
    run = RunFolder(cfg.output)
    out = run.root
    out.mkdir(parents=True, exist_ok=True)
    mon = Monitor(f, probe, reference=g, config=cfg.probe, every_n_steps=cfg.monitor.every_n_epochs * steps_per_epoch,
                  log_dir=str(out / "tb"), thresholds=cfg.monitor.thresholds)
    budget = None
    if cfg.train.dp is not None:  # the noise for the target, and a delta too large for N, before any step
        from ..dp import privacy_budget

        budget = privacy_budget(cfg.train.dp, split.train_f.numel(), cfg.train.batch_size, cfg.train.epochs).to_dict()
    with mon:
        _preflight(cfg, f, mon, images)  # every listed stage's plan, on the built model, before training
        losses_f, losses_g = train_twins(f, g, images, split, cfg.train, monitor=mon, progress=progress,
                                         checkpoint_dir=out / "checkpoints", resume=resume, force=force,
                                         fingerprint_extra=recipe_fingerprint(cfg))
        final = mon.compute()
    summary = summarize(cfg, mon, final, (losses_f, losses_g), steps_per_epoch, time.perf_counter() - t0)
    if budget is not None:
        summary["dp"] = budget
        _log_dp(out / "tb", budget, cfg.train.epochs * steps_per_epoch)
    atomic_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_text(out / "summary.md", format_summary(summary))
    # split first, then the models (recording the split's digest), then the scores (recording the
    # models'): a run killed in between leaves files whose recorded inputs do not match, which
    # every stage refuses
    split.save_json(run.split_path)
    assert mon.last is not None  # summarize raised otherwise
    models = {name: save_trained(run, name, m, cfg, images, dp=budget) for name, m in (("f", f), ("g", g))}
    ScoreSet.from_probe(mon.last, run.provenance("split", "f", "g", recipe=recipe_digest(cfg))).save(run.scores_path)
    write_json(run.report_path("train"), {"stage": "train", "models": models, "seconds": summary["seconds"]})
    summary["stages"] = {stage: run_stage(stage, cfg, progress=progress, data=(images, labels))
                         for stage in cfg.surgery.stages}
    return summary


def _log_dp(log_dir: Path, budget: dict[str, Any], step: int) -> None:
    """The privacy spent, next to the probes in TensorBoard (``dp/epsilon``, ``dp/noise_multiplier``)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for key in ("epsilon", "noise_multiplier", "sample_rate"):
            if budget[key] != float("inf"):  # the noise-free control spends no finite epsilon
                writer.add_scalar(f"dp/{key}", budget[key], step)


def _preflight(cfg: RunConfig, f: torch.nn.Module, mon: Monitor, images: torch.Tensor) -> None:
    """Run each listed stage's check on f as built, with scores shaped like the monitor's dry probe
    (random values: only the layers and unit counts matter), so a recipe that cannot finish fails
    before its first training step."""
    if not any(STAGES[s].check for s in cfg.surgery.stages):
        return
    dry = mon.dry_result
    gen = torch.Generator().manual_seed(0)
    real = ScoreSet.from_probe(dry)
    scores = ScoreSet({m: {k: torch.rand(v.shape, generator=gen) for k, v in d.items()} for m, d in real.units.items()},
                      real.argmax, {m: {k: float(torch.rand((), generator=gen)) for k in d} for m, d in real.layers.items()},
                      real.options)
    pre = Preflight(cfg, f, scores, torch.zeros((1, *images.shape[1:])), tuple(cfg.surgery.stages))
    for name in cfg.surgery.stages:
        check = STAGES[name].check
        if check is not None:
            try:
                check(pre)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"stage {name!r} could not run on this recipe's model: {e}") from e
