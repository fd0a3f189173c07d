"""The stage registry: what ``memsurgery run`` does after training, and what the CLI runs one by one.

:data:`STAGES` maps each stage's name to its :class:`Stage`, in pipeline order: score -> prune ->
swap -> finetune -> retrain -> export -> report. That one registry gives the order ``surgery.stages`` must
follow, the section each stage needs, the CLI's sub-commands and their help, the check each stage
makes on the built model before training starts, and the rows of ``report.md``.

Each stage reads its inputs from the recipe's output folder (see :mod:`memsurgery.recipe.folder`),
checks their provenance, writes its model and ``reports/<name>.json`` and returns that report.
:func:`run_stage` runs one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_path, atomic_text, write_json
from ..surgery.scores import ScoreSet
from .folder import RunFolder, digest_inputs, output_digest
from .schema import FinetuneStageConfig, PruneConfig, RetrainConfig, RunConfig, SwapConfig
from .setup import (
    Data,
    Evaluator,
    build_twins,
    load_checkpoint_weights,
    load_data,
    recipe_digest,
    save_trained,
)
from .summary import format_report


@dataclass(frozen=True)
class Preflight:
    """What a stage's check sees before training starts: the recipe, f as built (untrained), the
    scores of the monitor's dry probe (the shapes of the real ones; random values), an example
    input, and the stages the recipe lists."""

    cfg: RunConfig
    model: nn.Module
    scores: ScoreSet
    example: torch.Tensor
    listed: tuple[str, ...]


StageFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage: ``run(cfg, progress=, data=, **options) -> report``. ``section`` is the
    ``surgery.<section>`` it needs; ``check`` raises on a recipe it cannot run, on the built model,
    before training; ``row`` describes its report in ``report.md``; ``options`` are its extra CLI
    options (``(flag, help)``), passed to ``run`` as keyword arguments."""

    name: str
    help: str
    run: StageFn
    section: str | None = None
    check: Callable[[Preflight], None] | None = None
    row: Callable[[dict[str, Any]], list[str]] | None = None
    options: tuple[tuple[str, str], ...] = ()


STAGES: dict[str, Stage] = {}


def _register(help: str, **kwargs: Any) -> Callable[[StageFn], StageFn]:
    def add(fn: StageFn) -> StageFn:
        name = fn.__name__.removeprefix("stage_")
        STAGES[name] = Stage(name, help, fn, **kwargs)
        return fn

    return add


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown stage {name!r}.{hint} Stages: {', '.join(STAGES)}")
    return STAGES[name]


def section(cfg: RunConfig, name: str) -> Any:
    """``cfg.surgery.<name>``, or an error saying the recipe lacks it."""
    value = getattr(cfg.surgery, name)
    if value is None:
        raise ValueError(f"stage {name!r} needs surgery.{name}, but the recipe has no surgery.{name} section: add one "
                         "(see recipes/quickstart.yaml)")
    return value


def run_stage(name: str, cfg: RunConfig, progress: bool = True, data: Data | None = None, **options: Any) -> dict[str, Any]:
    """Run one stage on the recipe's output folder; adds ``seconds`` to its report and writes it to
    ``reports/<name>.json`` (the ``report`` stage writes ``report.json`` / ``report.md``)."""
    stage = get_stage(name)
    if stage.section is not None:
        section(cfg, stage.section)
    t0 = time.perf_counter()
    out = stage.run(cfg, progress=progress, data=data, **options)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if name != "report":
        write_json(RunFolder(cfg.output).report_path(name), out)
    return out


# ---------------------------------------------------------------------------- shared helpers
def _data(cfg: RunConfig, progress: bool, data: Data | None) -> Data:
    """The recipe's (images, labels): ``data`` when the caller already loaded them (``run_recipe``
    passes its own to every stage), else loaded once here."""
    return data if data is not None else load_data(cfg.data, progress)


def _trained(run: RunFolder, cfg: RunConfig, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """f / g and its metadata, refused unless it comes from this recipe and this folder's split."""
    model, meta = run.load(name)
    recorded = (meta.get("extra") or {}).get("provenance")
    run.require(f"{name}.safetensors", recorded, {"recipe": recipe_digest(cfg), "split": run.digest("split")},
                "memsurgery run <recipe>")
    return model, meta


def _scores(run: RunFolder, cfg: RunConfig, *models: str) -> ScoreSet:
    """scores.json, checked to come from this folder's f (and g) and this recipe."""
    scores = ScoreSet.load(run.scores_path)
    run.require("scores.json", scores.provenance, {"recipe": recipe_digest(cfg), **{m: run.digest(m) for m in models}},
                "memsurgery score <recipe>")
    return scores


def with_weights(model: nn.Module, scores: Mapping[str, float]) -> dict[str, float]:
    """The layers of ``scores`` that have parameters (a residual sum has none to swap or train)."""
    return {k: v for k, v in scores.items() if any(True for _ in model.get_submodule(k).parameters())}


def _acc(d: dict[str, float] | None) -> str:
    return f"{d.get('linear_acc', float('nan')):.4f}" if d else ""


def _plan_row(name: str) -> Callable[[dict[str, Any]], list[str]]:
    def row(s: dict[str, Any]) -> list[str]:
        changed = ", ".join(f"{k} ({len(v)})" for k, v in s["plan"].get("units", {}).items() if v) or \
            ", ".join(s["plan"].get("layers", []))
        return [name, changed, _acc(s["accuracy_before"]), _acc(s["accuracy_after"]),
                str(s["changes"].get("params_before", "")), str(s["changes"].get("params_after", ""))]

    return row


# ---------------------------------------------------------------------------- score
@_register("measure UnitMem / ClassMem / LayerMem / ΔLayerMem of the trained f (writes scores.json)")
def stage_score(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Probe f (against g when it exists) on the candidates and write ``scores.json``."""
    from ..data import TwinSplit
    from ..probe import run_probe

    run = RunFolder(cfg.output)
    f, _ = _trained(run, cfg, "f")
    g = _trained(run, cfg, "g")[0] if run.model_path("g").exists() else None
    images, labels = _data(cfg, progress, data)
    split = TwinSplit.load_json(run.split_path)
    probe_cfg = dataclasses.replace(cfg.probe, progress=progress)
    result = run_probe(f, images, split.candidates, reference=g, labels=labels, config=probe_cfg)
    names = ("split", "f", "g") if g is not None else ("split", "f")
    scores = ScoreSet.from_probe(result, run.provenance(*names, recipe=recipe_digest(cfg)))
    scores.save(run.scores_path)
    units = {m: {k: float(v[~torch.isnan(v)].mean()) if (~torch.isnan(v)).any() else None for k, v in d.items()}
             for m, d in scores.units.items()}
    return {"stage": "score", "unit_means": units, "layers": scores.layers, "options": scores.options}


# ---------------------------------------------------------------------------- prune
def _plan_prune(f: nn.Module, pc: PruneConfig, scores: ScoreSet, example: torch.Tensor) -> Any:
    from ..surgery.plan import plan_units
    from ..surgery.prune import group_scores

    unit_scores = scores.unit(pc.score)
    if pc.mode == "structural":  # coupled layers (residual sums) lose the same channels: one score per group
        unit_scores = group_scores(f, unit_scores, example)
    plan = plan_units(unit_scores, pc.strategy, ratio=pc.ratio, count=pc.count, scope=pc.scope,
                      seed=pc.seed, protected=pc.protected, score_name=pc.score)
    plan.check(f)
    return plan


def _check_prune(pre: Preflight) -> None:
    _plan_prune(pre.model, section(pre.cfg, "prune"), pre.scores, pre.example)


@_register("prune units of f ranked by UnitMem (zeroing or structural) and export the pruned model",
           section="prune", check=_check_prune, row=_plan_row("prune"))
def stage_prune(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Plan from per-unit scores, zero or remove the units, re-fit the linear probe, export."""
    from ..surgery.prune import prune_structural_, zero_units_

    pc: PruneConfig = section(cfg, "prune")
    run = RunFolder(cfg.output)
    f, meta = _trained(run, cfg, "f")
    scores = _scores(run, cfg, "f")
    example = torch.zeros((1, *meta["input_shape"][1:]))
    plan = _plan_prune(f, pc, scores, example)
    evaluate = Evaluator.of(cfg, _data(cfg, progress, data))
    before = evaluate(f)
    model = copy.deepcopy(f)
    history = None
    if pc.mode == "zero":
        rep = zero_units_(model, plan)
    else:
        rep = prune_structural_(model, plan, example, heads=pc.heads)
        history = rep.extra.get("history")
    after = evaluate(model)
    inputs = run.provenance("f", "scores", recipe=recipe_digest(cfg))
    saved = run.save("pruned", model, meta, plan=plan, history=history, options=scores.options,
                     scores={pc.score: scores.unit(pc.score)},
                     extra={"stage": "prune", "config": dataclasses.asdict(pc), "provenance": inputs})
    return {"stage": "prune", "config": dataclasses.asdict(pc), "plan": plan.to_dict(), "changes": rep.to_dict(),
            "accuracy_before": before, "accuracy_after": after, "model": saved,
            "provenance": {**inputs, "pruned": run.digest("pruned")}}


# ---------------------------------------------------------------------------- swap
def _donor_path(sc: SwapConfig) -> Path:
    path = Path(sc.donor)
    if not path.is_file():
        raise FileNotFoundError(f"surgery.swap.donor {sc.donor!r} is neither 'g' nor an existing exported .safetensors "
                                "encoder: export one with memsurgery.save_model, or use donor: g")
    return path


def _plan_swap(f: nn.Module, sc: SwapConfig, scores: ScoreSet) -> Any:
    from ..surgery.plan import plan_layers

    plan = plan_layers(with_weights(f, scores.layer(sc.score)), sc.strategy, k=sc.k, seed=sc.seed,
                       protected=sc.protected, score_name=sc.score)
    plan.check(f)
    return plan


def _check_swap(pre: Preflight) -> None:
    sc: SwapConfig = section(pre.cfg, "swap")
    if sc.donor != "g":
        from ..capture import check_same_architecture
        from ..export import load_model

        check_same_architecture(pre.model, load_model(_donor_path(sc))[0])
    _plan_swap(pre.model, sc, pre.scores)


@_register("replace f's top-ranked layers by a donor encoder's and export the result",
           section="swap", check=_check_swap, row=_plan_row("swap"))
def stage_swap(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Replace f's top-ranked layers by the donor's, re-fit the linear probe, export."""
    from ..export import load_model
    from ..surgery.swap import swap_layers_

    sc: SwapConfig = section(cfg, "swap")
    run = RunFolder(cfg.output)
    f, meta = _trained(run, cfg, "f")
    if sc.donor == "g":
        donor, _ = _trained(run, cfg, "g")
    else:
        donor = load_model(_donor_path(sc))[0]
    scores = _scores(run, cfg, "f", *(("g",) if sc.donor == "g" else ()))
    plan = _plan_swap(f, sc, scores)
    images, labels = _data(cfg, progress, data)
    evaluate = Evaluator.of(cfg, (images, labels))
    before = evaluate(f)
    model = copy.deepcopy(f)
    rep = swap_layers_(model, donor, plan, weights_only=sc.weights_only)
    after = evaluate(model)
    inputs = run.provenance("f", "scores", *(("g",) if sc.donor == "g" else ()), recipe=recipe_digest(cfg))
    saved = run.save("swapped", model, meta, plan=plan, options=scores.options, scores={sc.score: scores.layer(sc.score)},
                     extra={"stage": "swap", "config": dataclasses.asdict(sc), "provenance": inputs})
    report = {"stage": "swap", "config": dataclasses.asdict(sc), "plan": plan.to_dict(), "changes": rep.to_dict(),
              "accuracy_before": before, "accuracy_after": after, "model": saved,
              "provenance": {**inputs, "swapped": run.digest("swapped")}}
    if sc.rescore:
        g = donor if sc.donor == "g" else run.load("g")[0]
        report["layermem"] = _rescore(cfg, run, f, g, model, plan, images, progress)
    return report


def _rescore(cfg: RunConfig, run: RunFolder, f: nn.Module, g: nn.Module, swapped: nn.Module, plan: Any,
             images: torch.Tensor, progress: bool) -> dict[str, dict[str, float]]:
    """LayerMem of the candidates before the swap, for f' = f with the donor's layers against g,
    and for f against g' = g with f's layers (METRICS.md §7: the swap moves the memorization)."""
    from ..data import TwinSplit
    from ..probe import run_probe
    from ..surgery.swap import swap_layers_

    g_swapped = copy.deepcopy(g)
    swap_layers_(g_swapped, f, plan)
    split = TwinSplit.load_json(run.split_path)
    probe_cfg = dataclasses.replace(cfg.probe, unit_layers=None, progress=progress)
    out = {}
    for key, (a, b) in {"before": (f, g), "f_swapped_vs_g": (swapped, g), "f_vs_g_swapped": (f, g_swapped)}.items():
        out[key] = run_probe(a, images, split.candidates, reference=b, config=probe_cfg).layermem
    return out


# ---------------------------------------------------------------------------- finetune
_SOURCE_STAGE = {"pruned": "prune", "swapped": "swap"}


def _select_finetuned(model: nn.Module, fc: FinetuneStageConfig, scores: ScoreSet | None) -> tuple[str, ...]:
    from ..surgery.finetune import select_layers

    layer_scores = with_weights(model, scores.layer(fc.score)) if fc.policy == "ranked" and scores is not None else None
    return select_layers(model, fc.policy, scores=layer_scores, k=fc.k)


def _check_finetune(pre: Preflight) -> None:
    fc: FinetuneStageConfig = section(pre.cfg, "finetune")
    if fc.source in _SOURCE_STAGE:
        maker = _SOURCE_STAGE[fc.source]
        listed = pre.listed[: pre.listed.index("finetune")]
        if maker not in listed:
            raise ValueError(f"surgery.finetune.source is {fc.source!r}, but the recipe's stages do not run {maker!r} "
                             f"before finetune (stages: {', '.join(pre.listed)}): training writes a new f, so an earlier "
                             f"{fc.source}.safetensors would be stale; list {maker!r} before 'finetune', or use source: f")
    _select_finetuned(pre.model, fc, pre.scores)


def _finetune_row(s: dict[str, Any]) -> list[str]:
    return [f"finetune ({s['config']['policy']}, from {s['config']['source']})", ", ".join(s["layers"]) or "head only",
            _acc(s["accuracy_before"]), _acc(s["accuracy_after"]), "", ""]


@_register("fine-tune chosen layers + a linear head on the labelled data and export",
           section="finetune", check=_check_finetune, row=_finetune_row)
def stage_finetune(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Fine-tune the chosen layers and a linear head on the labelled training split."""
    from ..surgery.finetune import FinetuneConfig, finetune_

    fc: FinetuneStageConfig = section(cfg, "finetune")
    run = RunFolder(cfg.output)
    if fc.source == "f":
        model, meta = _trained(run, cfg, "f")
    else:  # the pruned / swapped model must be the one its stage's report describes, made from this f
        model, meta = run.load(fc.source)
        stage = _SOURCE_STAGE[fc.source]
        path = run.report_path(stage)
        recorded = json.loads(path.read_text()).get("provenance") if path.is_file() else None
        run.require(f"{fc.source}.safetensors", recorded, {fc.source: run.digest(fc.source), "f": run.digest("f")},
                    f"memsurgery {stage} <recipe>")
    layers = _select_finetuned(model, fc, _scores(run, cfg, "f") if fc.policy == "ranked" else None)
    images, labels = _data(cfg, progress, data)
    evaluate = Evaluator.of(cfg, (images, labels))
    tr, te = evaluate.train_idx, evaluate.test_idx
    ft_cfg = FinetuneConfig(epochs=fc.epochs, lr=fc.lr, batch_size=fc.batch_size, weight_decay=fc.weight_decay,
                            seed=fc.seed, mean=cfg.train.mean, std=cfg.train.std, views=fc.views)
    result = finetune_(model, layers, images[tr], labels[tr], images[te], labels[te], ft_cfg)
    after = evaluate(model)
    # a structurally pruned source keeps its pruning history: the loader rebuilds its shapes from it
    inputs = run.provenance(fc.source, recipe=recipe_digest(cfg))
    saved = run.save("finetuned", model, meta, history=meta.get("history"), plan=meta.get("plan"),
                     extra={"stage": "finetune", "config": dataclasses.asdict(fc), "layers": list(layers),
                            "source": fc.source, "head": "finetuned_head.safetensors", "provenance": inputs})
    save_head(result.head, run.root / "finetuned_head.safetensors")
    return {"stage": "finetune", "config": dataclasses.asdict(fc), "layers": list(layers),
            "changes": result.report.to_dict(), "accuracy_before": {"linear_acc": result.acc_before},
            "accuracy_after": {"linear_acc": result.acc_after}, "linear_probe_after": after, "model": saved,
            "provenance": {**inputs, "finetuned": run.digest("finetuned")}}


def save_head(head: nn.Linear, path: Path) -> None:
    """The fine-tuned linear head (features -> logits), written atomically next to its encoder."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(tmp),
                  metadata={"in_features": str(head.in_features), "out_features": str(head.out_features)})


# ---------------------------------------------------------------------------- retrain
def _check_retrain(pre: Preflight) -> None:
    rc: RetrainConfig = section(pre.cfg, "retrain")
    s, bs = pre.cfg.split, pre.cfg.train.batch_size
    if rc.k > s.candidates:
        raise ValueError(f"surgery.retrain.k is {rc.k}, but there are only {s.candidates} candidates to rank and remove: "
                         f"lower k or raise split.candidates")
    if s.shared + s.candidates - rc.k < bs:
        raise ValueError(f"after removing {rc.k} points, f's {s.shared + s.candidates - rc.k} training points are fewer "
                         f"than one batch ({bs}): lower k or train.batch_size")


def removal_sets(indices: torch.Tensor, sslmem: torch.Tensor, k: int, seed: int) -> dict[str, list[int]]:
    """The k candidates (dataset indices) each strategy removes: ``top`` the highest SSLMem', ``low``
    the lowest (ties by index, so the sets are reproducible), ``random`` a seeded draw."""
    if sslmem.shape != indices.shape or sslmem.isnan().any():
        raise ValueError("every candidate needs a finite SSLMem' to be ranked")
    order = sorted(range(len(indices)), key=lambda i: (-float(sslmem[i]), int(indices[i])))
    pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))[:k]
    sets = {"top": [int(indices[i]) for i in order[:k]], "low": [int(indices[i]) for i in order[-k:]],
            "random": [int(indices[i]) for i in pick]}
    return {name: sorted(v) for name, v in sets.items()}


def _retrain_row(s: dict[str, Any]) -> list[str]:
    accs = " / ".join(f"{name} {r['accuracy']['linear_acc']:.4f}" for name, r in s["strategies"].items())
    return [f"retrain (remove {s['config']['k']})", f"f retrained without: {accs}", _acc(s["accuracy_f"]), "", "", ""]


@_register("remove the k most / random / least memorized candidates, retrain f on the rest, compare accuracy",
           section="retrain", check=_check_retrain, row=_retrain_row)
def stage_retrain(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Rank the candidates by final-layer SSLMem' (f against g), then for each strategy retrain f from
    its initialization without its k points and record the linear probe. Each retrained model is
    exported as ``retrain_<strategy>.safetensors`` with the removed indices in its metadata; the
    indices are also in ``retrain_removed.json`` and the report."""
    from ..data import TwinSplit
    from ..probe import run_probe
    from ..train import train_ssl

    rc: RetrainConfig = section(cfg, "retrain")
    run = RunFolder(cfg.output)
    f, meta = _trained(run, cfg, "f")
    g, _ = _trained(run, cfg, "g")
    images, labels = _data(cfg, progress, data)
    split = TwinSplit.load_json(run.split_path)
    result = run_probe(f, images, split.candidates, reference=g,
                       config=dataclasses.replace(cfg.probe, unit_layers=None, progress=progress))
    removed = removal_sets(result.indices, result.sslmem_final, rc.k, rc.seed)
    mem = dict(zip(result.indices.tolist(), result.sslmem_final.tolist(), strict=True))
    inputs = run.provenance("split", "f", "g", recipe=recipe_digest(cfg))
    write_json(run.root / "retrain_removed.json", {"ranked_by": f"sslmem_final ({result.final_layer}, f vs g)",
                                                  "k": rc.k, "removed": {s: removed[s] for s in rc.strategies},
                                                  "provenance": inputs})
    evaluate = Evaluator.of(cfg, (images, labels))
    out: dict[str, Any] = {}
    models = {}
    train_f = torch.as_tensor(split.train_f).long()
    for strategy in rc.strategies:
        drop = torch.tensor(removed[strategy])
        keep = train_f[~torch.isin(train_f, drop)]
        model = build_twins(cfg, images)[0]  # f's initialization
        losses = train_ssl(model, images, keep, cfg.train, progress=progress)
        name = f"retrain_{strategy}"
        models[strategy] = run.save(name, model, {"arch": meta["arch"], "input_shape": meta["input_shape"]},
                                    options=cfg.probe.options(),
                                    extra={"stage": "retrain", "strategy": strategy, "removed": removed[strategy],
                                           "ranked_by": "sslmem_final", "provenance": inputs})
        out[strategy] = {"removed": removed[strategy], "accuracy": evaluate(model), "final_loss": losses[-1],
                         "removed_sslmem_mean": sum(mem[i] for i in removed[strategy]) / rc.k,
                         "trained_points": int(keep.numel())}
    return {"stage": "retrain", "config": dataclasses.asdict(rc), "accuracy_f": evaluate(f), "strategies": out,
            "models": models, "provenance": inputs}


# ---------------------------------------------------------------------------- export
def _check_export(pre: Preflight) -> None:
    if pre.cfg.train.checkpoint_every is None:
        raise ValueError("stage 'export' rebuilds f and g from a training checkpoint, but train.checkpoint_every is "
                         "not set, so training writes none: set it, or drop 'export' (training exports f and g itself)")


@_register("export f and g from a training checkpoint as safetensors", check=_check_export,
           options=(("--checkpoint", "checkpoint folder (default: the newest under <output>/checkpoints)"),))
def stage_export(cfg: RunConfig, progress: bool = True, data: Data | None = None,
                 checkpoint: str | None = None) -> dict[str, Any]:
    """Export f and g from a training checkpoint (default: the newest) as safetensors."""
    from ..train import latest_checkpoint

    run = RunFolder(cfg.output)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run.root / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run.root / 'checkpoints'}: train with train.checkpoint_every "
                                "set, or pass --checkpoint DIR")
    images, _ = _data(cfg, progress, data)
    f, g = build_twins(cfg, images)
    load_checkpoint_weights(ckpt, [f, g])
    dp = None
    if cfg.train.dp is not None:  # the privacy spent up to this checkpoint
        from ..dp import privacy_budget
        from ..train import read_state

        state = read_state(ckpt) or {}
        n = cfg.split.shared + cfg.split.candidates
        dp = privacy_budget(cfg.train.dp, n, cfg.train.batch_size, cfg.train.epochs, state.get("epoch")).to_dict()
    saved = {name: save_trained(run, name, m, cfg, images, dp=dp) for name, m in (("f", f), ("g", g))}
    return {"stage": "export", "checkpoint": str(ckpt), "models": saved, **({"dp": dp} if dp else {})}


# ---------------------------------------------------------------------------- report
@_register("reload every exported model strictly, check its outputs, write report.md / report.json")
def stage_report(cfg: RunConfig, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Collect every stage's report, reload every exported model strictly and check its outputs
    are bit-identical to those recorded at export; write ``report.md`` and ``report.json``."""
    from ..export import load_model

    run = RunFolder(cfg.output)
    if not run.root.is_dir():
        raise FileNotFoundError(f"no run folder at {run.root}: run `memsurgery run <recipe>` first (or pass the "
                                "--output the run used)")
    reports = {}
    for stage in ("train", *(s for s in STAGES if s != "report")):
        p = run.report_path(stage)
        if p.exists():
            try:
                reports[stage] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not a stage report (invalid JSON: {e}); run `memsurgery {stage} <recipe>` "
                                 "again to rewrite it") from e
    if not reports:
        raise FileNotFoundError(f"{run.root} holds no stage report (reports/*.json): run `memsurgery run <recipe>` first")
    reloads = []
    for stage, rep in reports.items():
        models = rep.get("models") or ({"model": rep["model"]} if "model" in rep else {})
        for info in models.values():
            model, meta = load_model(run.root / info["path"])
            digest = output_digest(model, digest_inputs(tuple(meta["input_shape"])))
            reloads.append({"stage": stage, "path": info["path"], "params": sum(p.numel() for p in model.parameters()),
                            "bit_identical": digest == info["output_digest"]})
    out = {"stage": "report", "stages": reports, "reload": reloads}
    rows = [row(reports[name]) for name, s in STAGES.items() if (row := s.row) is not None and name in reports]
    write_json(run.root / "report.json", out)
    atomic_text(run.root / "report.md", format_report(out, rows))
    if not all(r["bit_identical"] for r in reloads):
        bad = [r["path"] for r in reloads if not r["bit_identical"]]
        raise ValueError(f"reloaded models differ from what was exported: {', '.join(bad)}; re-run the stages that "
                         "wrote them")
    return out
