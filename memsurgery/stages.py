"""The stages ``memsurgery run`` performs after training, and the CLI runs one by one.

Each ``stage_<name>(cfg, progress)`` reads its inputs from the recipe's output folder, writes its
model and ``reports/<name>.json``, and returns that report (see :mod:`memsurgery.pipeline`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_text
from .pipeline import Evaluator, RunFolder, output_digest, timed, write_json
from .surgery.scores import ScoreSet

Data = tuple[torch.Tensor, torch.Tensor]


def _data(cfg: Any, progress: bool, data: Data | None) -> Data:
    """The recipe's (images, labels): ``data`` when the caller already loaded them (``run_recipe``
    passes its own to every stage), else loaded once here."""
    from .recipe import _load_data

    return data if data is not None else _load_data(cfg.data, progress)


def _evaluator(cfg: Any, images: torch.Tensor, labels: torch.Tensor) -> Evaluator:
    return Evaluator(images, labels, cfg.surgery.evaluate, cfg.train.mean, cfg.train.std)


def _recipe(cfg: Any) -> str:
    from .recipe import recipe_digest

    return str(recipe_digest(cfg))


def _trained(run: RunFolder, cfg: Any, name: str, meta: dict[str, Any]) -> None:
    """f / g must come from this recipe and this folder's split."""
    recorded = (meta.get("extra") or {}).get("provenance")
    run.require(f"{name}.safetensors", recorded, {"recipe": _recipe(cfg), "split": run.digest("split")},
                "memsurgery run <recipe>")


def _scores(run: RunFolder, cfg: Any, *models: str) -> ScoreSet:
    """scores.json, checked to come from this folder's f (and g) and this recipe."""
    scores = ScoreSet.load(run.scores_path)
    run.require("scores.json", scores.provenance, {"recipe": _recipe(cfg), **{m: run.digest(m) for m in models}},
                "memsurgery score <recipe>")
    return scores


def _need(cfg: Any, name: str) -> Any:
    section = getattr(cfg.surgery, name)
    if section is None:
        raise ValueError(f"the recipe has no surgery.{name} section: add one (see recipes/quickstart.yaml)")
    return section


@timed
def stage_score(cfg: Any, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Probe f (against g when it exists) on the candidates and write ``scores.json``."""
    from .data import TwinSplit
    from .probe import run_probe

    run = RunFolder(cfg.output)
    f, fmeta = run.load("f")
    _trained(run, cfg, "f", fmeta)
    g = None
    if run.model_path("g").exists():
        g, gmeta = run.load("g")
        _trained(run, cfg, "g", gmeta)
    images, labels = _data(cfg, progress, data)
    split = TwinSplit.load_json(run.split_path)
    probe_cfg = dataclasses.replace(cfg.probe, progress=progress)
    result = run_probe(f, images, split.candidates, reference=g, labels=labels, config=probe_cfg)
    names = ("split", "f", "g") if g is not None else ("split", "f")
    scores = ScoreSet.from_probe(result, run.provenance(*names, recipe=_recipe(cfg)))
    scores.save(run.scores_path)
    report = _score_report(scores)
    return report


def with_weights(model: torch.nn.Module, scores: dict[str, float]) -> dict[str, float]:
    """The layers of ``scores`` that have parameters (a residual sum has none to swap or train)."""
    return {k: v for k, v in scores.items() if any(True for _ in model.get_submodule(k).parameters())}


def _score_report(scores: ScoreSet) -> dict[str, Any]:
    units = {m: {k: float(v[~torch.isnan(v)].mean()) if (~torch.isnan(v)).any() else None for k, v in d.items()}
             for m, d in scores.units.items()}
    return {"stage": "score", "unit_means": units, "layers": scores.layers, "options": scores.options}


@timed
def stage_prune(cfg: Any, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Plan from per-unit scores, zero or remove the units, re-fit the linear probe, export."""
    from .surgery.plan import plan_units
    from .surgery.prune import group_scores, prune_structural_, zero_units_

    pc = _need(cfg, "prune")
    run = RunFolder(cfg.output)
    f, meta = run.load("f")
    _trained(run, cfg, "f", meta)
    scores = _scores(run, cfg, "f")
    example = torch.zeros((1, *meta["input_shape"][1:]))
    unit_scores = scores.unit(pc.score)
    if pc.mode == "structural":  # coupled layers (residual sums) lose the same channels: one score per group
        unit_scores = group_scores(f, unit_scores, example)
    plan = plan_units(unit_scores, pc.strategy, ratio=pc.ratio, count=pc.count, scope=pc.scope,
                      seed=pc.seed, protected=pc.protected, score_name=pc.score)
    plan.check(f)
    images, labels = _data(cfg, progress, data)
    evaluate = _evaluator(cfg, images, labels)
    before = evaluate(f)
    model = copy.deepcopy(f)
    history = None
    if pc.mode == "zero":
        rep = zero_units_(model, plan)
    else:
        rep = prune_structural_(model, plan, example, heads=pc.heads)
        history = rep.extra.get("history")
    after = evaluate(model)
    inputs = run.provenance("f", "scores", recipe=_recipe(cfg))
    saved = run.save("pruned", model, meta, plan=plan, history=history, options=scores.options,
                     scores={pc.score: scores.unit(pc.score)},
                     extra={"stage": "prune", "config": dataclasses.asdict(pc), "provenance": inputs})
    report = {"stage": "prune", "config": dataclasses.asdict(pc), "plan": plan.to_dict(), "changes": rep.to_dict(),
              "accuracy_before": before, "accuracy_after": after, "model": saved,
              "provenance": {**inputs, "pruned": run.digest("pruned")}}
    return report


@timed
def stage_swap(cfg: Any, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Replace f's top-ranked layers by the donor's, re-fit the linear probe, export."""
    from .export import load_model
    from .surgery.plan import plan_layers
    from .surgery.swap import swap_layers_

    sc = _need(cfg, "swap")
    run = RunFolder(cfg.output)
    f, meta = run.load("f")
    _trained(run, cfg, "f", meta)
    if sc.donor == "g":
        donor, gmeta = run.load("g")
        _trained(run, cfg, "g", gmeta)
    else:
        donor = load_model(Path(sc.donor))[0]
    scores = _scores(run, cfg, "f", *(("g",) if sc.donor == "g" else ()))
    plan = plan_layers(with_weights(f, scores.layer(sc.score)), sc.strategy, k=sc.k, seed=sc.seed, protected=sc.protected,
                       score_name=sc.score)
    plan.check(f)
    images, labels = _data(cfg, progress, data)
    evaluate = _evaluator(cfg, images, labels)
    before = evaluate(f)
    model = copy.deepcopy(f)
    rep = swap_layers_(model, donor, plan, weights_only=sc.weights_only)
    after = evaluate(model)
    inputs = run.provenance("f", "scores", *(("g",) if sc.donor == "g" else ()), recipe=_recipe(cfg))
    saved = run.save("swapped", model, meta, plan=plan, options=scores.options, scores={sc.score: scores.layer(sc.score)},
                     extra={"stage": "swap", "config": dataclasses.asdict(sc), "provenance": inputs})
    report = {"stage": "swap", "config": dataclasses.asdict(sc), "plan": plan.to_dict(), "changes": rep.to_dict(),
              "accuracy_before": before, "accuracy_after": after, "model": saved,
              "provenance": {**inputs, "swapped": run.digest("swapped")}}
    if sc.rescore:
        report["layermem"] = _rescore(cfg, run, f, model, plan, images, progress)
    return report


def _rescore(cfg: Any, run: RunFolder, f: torch.nn.Module, swapped: torch.nn.Module, plan: Any,
             images: torch.Tensor, progress: bool) -> dict[str, dict[str, float]]:
    """LayerMem of the candidates before the swap, for f' = f with the donor's layers against g,
    and for f against g' = g with f's layers (METRICS.md §7: the swap moves the memorization)."""
    from .data import TwinSplit
    from .probe import run_probe
    from .surgery.swap import swap_layers_

    g, _ = run.load("g")
    g_swapped = copy.deepcopy(g)
    swap_layers_(g_swapped, f, plan)
    split = TwinSplit.load_json(run.split_path)
    probe_cfg = dataclasses.replace(cfg.probe, unit_layers=None, progress=progress)
    out = {}
    for key, (a, b) in {"before": (f, g), "f_swapped_vs_g": (swapped, g), "f_vs_g_swapped": (f, g_swapped)}.items():
        out[key] = run_probe(a, images, split.candidates, reference=b, config=probe_cfg).layermem
    return out


@timed
def stage_finetune(cfg: Any, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Fine-tune the chosen layers and a linear head on the labelled training split."""
    from .surgery.finetune import FinetuneConfig, finetune_, select_layers

    fc = _need(cfg, "finetune")
    run = RunFolder(cfg.output)
    model, meta = run.load(fc.source)
    if fc.source == "f":
        _trained(run, cfg, "f", meta)
    else:  # the pruned / swapped model must be the one its stage's report describes, made from this f
        stage = {"pruned": "prune", "swapped": "swap"}[fc.source]
        path = run.report_path(stage)
        recorded = json.loads(path.read_text()).get("provenance") if path.is_file() else None
        run.require(f"{fc.source}.safetensors", recorded, {fc.source: run.digest(fc.source), "f": run.digest("f")},
                    f"memsurgery {stage} <recipe>")
    layer_scores = None
    if fc.policy == "ranked":
        layer_scores = with_weights(model, _scores(run, cfg, "f").layer(fc.score))
    layers = select_layers(model, fc.policy, scores=layer_scores, k=fc.k)
    images, labels = _data(cfg, progress, data)
    evaluate = _evaluator(cfg, images, labels)
    tr, te = evaluate.train_idx, evaluate.test_idx
    ft_cfg = FinetuneConfig(epochs=fc.epochs, lr=fc.lr, batch_size=fc.batch_size, weight_decay=fc.weight_decay,
                            seed=fc.seed, mean=cfg.train.mean, std=cfg.train.std, views=fc.views)
    result = finetune_(model, layers, images[tr], labels[tr], images[te], labels[te], ft_cfg)
    after = evaluate(model)
    # a structurally pruned source keeps its pruning history: the loader rebuilds its shapes from it
    inputs = run.provenance(fc.source, recipe=_recipe(cfg))
    saved = run.save("finetuned", model, meta, history=meta.get("history"), plan=meta.get("plan"),
                     extra={"stage": "finetune", "config": dataclasses.asdict(fc), "layers": list(layers),
                            "source": fc.source, "head": "finetuned_head.safetensors", "provenance": inputs})
    save_head(result.head, run.root / "finetuned_head.safetensors")
    report = {"stage": "finetune", "config": dataclasses.asdict(fc), "layers": list(layers),
              "changes": result.report.to_dict(), "accuracy_before": {"linear_acc": result.acc_before},
              "accuracy_after": {"linear_acc": result.acc_after}, "linear_probe_after": after, "model": saved,
              "provenance": {**inputs, "finetuned": run.digest("finetuned")}}
    return report


def save_head(head: torch.nn.Linear, path: Path) -> None:
    """The fine-tuned linear head (features -> logits), written atomically next to its encoder."""
    from safetensors.torch import save_file

    from ._io import atomic_path

    with atomic_path(path) as tmp:
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(tmp),
                  metadata={"in_features": str(head.in_features), "out_features": str(head.out_features)})


@timed
def stage_export(cfg: Any, progress: bool = True, checkpoint: str | None = None,
                 data: Data | None = None) -> dict[str, Any]:
    """Export f and g from a training checkpoint (default: the newest) as safetensors."""
    from .train import latest_checkpoint

    run = RunFolder(cfg.output)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run.root / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint under {run.root / 'checkpoints'}: train with train.checkpoint_every "
                                "set, or pass --checkpoint DIR")
    from .recipe import build_twins, load_checkpoint_weights

    images, _ = _data(cfg, progress, data)
    f, g = build_twins(cfg, images)
    load_checkpoint_weights(ckpt, [f, g])
    saved = {name: save_trained(run, name, m, cfg, images) for name, m in (("f", f), ("g", g))}
    report = {"stage": "export", "checkpoint": str(ckpt), "models": saved}
    return report


def save_trained(run: RunFolder, name: str, model: torch.nn.Module, cfg: Any, images: torch.Tensor) -> dict[str, Any]:
    """Export a trained encoder with the recipe's architecture and probe options."""
    from .recipe import model_kwargs

    meta = {"arch": {"name": cfg.model.name, "kwargs": model_kwargs(cfg, images)},
            "input_shape": [1, *images.shape[1:]]}
    return run.save(name, model, meta, options=cfg.probe.options(),
                    extra={"stage": "train", "config": json.loads(json.dumps(dataclasses.asdict(cfg.train), default=str)),
                           "provenance": run.provenance("split", recipe=_recipe(cfg))})


@timed
def stage_report(cfg: Any, progress: bool = True, data: Data | None = None) -> dict[str, Any]:
    """Collect every stage's report, reload every exported model strictly and check its outputs
    are bit-identical to those recorded at export; write ``report.md`` and ``report.json``."""
    from .export import load_model
    from .pipeline import digest_inputs

    run = RunFolder(cfg.output)
    if not run.root.is_dir():
        raise FileNotFoundError(f"no run folder at {run.root}: run `memsurgery run <recipe>` first (or pass the "
                                "--output the run used)")
    reports = {}
    for stage in ("train", "score", "prune", "swap", "finetune", "export"):
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
    write_json(run.root / "report.json", out)
    atomic_text(run.root / "report.md", format_report(out))
    if not all(r["bit_identical"] for r in reloads):
        bad = [r["path"] for r in reloads if not r["bit_identical"]]
        raise ValueError(f"reloaded models differ from what was exported: {', '.join(bad)}; re-run the stages that "
                         "wrote them")
    return out


def _acc(d: dict[str, float] | None) -> str:
    if not d:
        return ""
    return f"{d.get('linear_acc', float('nan')):.4f}"


def format_report(r: dict[str, Any]) -> str:
    lines = ["# memsurgery report", ""]
    st = r["stages"]
    rows = []
    for name in ("prune", "swap"):
        if name in st:
            s = st[name]
            changed = ", ".join(f"{k} ({len(v)})" for k, v in s["plan"].get("units", {}).items() if v) or \
                ", ".join(s["plan"].get("layers", []))
            rows.append(f"| {name} | {changed} | {_acc(s['accuracy_before'])} | {_acc(s['accuracy_after'])} | "
                        f"{s['changes'].get('params_before', '')} | {s['changes'].get('params_after', '')} |")
    if "finetune" in st:
        s = st["finetune"]
        rows.append(f"| finetune ({s['config']['policy']}, from {s['config']['source']}) | "
                    f"{', '.join(s['layers']) or 'head only'} | {_acc(s['accuracy_before'])} | "
                    f"{_acc(s['accuracy_after'])} | | |")
    if rows:
        lines += ["| stage | what changed | accuracy before | accuracy after | params before | params after |",
                  "|---|---|---:|---:|---:|---:|", *rows, ""]
    if r["reload"]:
        lines += ["Reload check (strict load, outputs compared with those recorded at export):", "",
                  "| model | stage | params | bit-identical |", "|---|---|---:|---|"]
        lines += [f"| {x['path']} | {x['stage']} | {x['params']} | {'yes' if x['bit_identical'] else 'NO'} |"
                  for x in r["reload"]]
    return "\n".join(lines) + "\n"


STAGE_FUNCTIONS = {"score": stage_score, "prune": stage_prune, "swap": stage_swap, "finetune": stage_finetune,
                   "export": stage_export, "report": stage_report}
