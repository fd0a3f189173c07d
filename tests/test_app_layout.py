"""The application package (memsurgery.recipe): its layering, its one stage registry, and the
checks it makes on a recipe before any work."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from memsurgery.recipe import STAGES, ConfigError, RunConfig, check_recipe, from_dict
from memsurgery.recipe.summary import format_report

ROOT = Path(__file__).resolve().parents[1]
APP = ("memsurgery.recipe", "memsurgery.cli", "memsurgery.audit")  # the front-ends


def _modules() -> dict[str, Path]:
    mods = {}
    for package, folder in (("memsurgery", ROOT / "memsurgery"), ("memsurgery.integrations", ROOT / "integrations")):
        for p in folder.rglob("*.py"):
            parts = list(p.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = p
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Every memsurgery module -> the memsurgery modules it imports, at the top or inside a function."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "memsurgery":
                    graph[mod].add(name)
    return graph


def test_the_graph_sees_lazy_imports():
    graph = _import_graph()
    assert "memsurgery.recipe.stages" in graph["memsurgery.recipe.run"]  # a top-level import
    assert "memsurgery.surgery.prune" in graph["memsurgery.recipe.stages"]  # imported inside a function
    assert "memsurgery.recipe" in graph["memsurgery.cli"]


def test_no_module_imports_itself_back():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n] if n in path else [m, n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_never_imports_the_application():
    graph = _import_graph()
    bad = {m: sorted(n for n in deps if n.startswith(APP)) for m, deps in graph.items() if not m.startswith(APP)}
    assert not {m: d for m, d in bad.items() if d}


def test_the_old_application_modules_are_gone():
    for name in ("config", "pipeline", "stages", "recipe"):
        assert not (ROOT / "memsurgery" / f"{name}.py").exists()


def test_no_load_path_unpickles():
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("memsurgery", "integrations") for p in (ROOT / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert not hits


# ---------------------------------------------------------------------------- the registry
def test_every_stage_is_typed_on_the_one_config():
    for stage in STAGES.values():
        hints = typing.get_type_hints(stage.run)
        assert hints["cfg"] is RunConfig, stage.name


def test_the_registry_gives_the_cli_its_commands_and_help():
    from memsurgery.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, stage in STAGES.items():
        assert helps[name] == stage.help
        flags = {f for a in sub.choices[name]._actions for f in a.option_strings}
        assert {flag for flag, _ in stage.options} <= flags
    assert "--checkpoint" in {f for a in sub.choices["export"]._actions for f in a.option_strings}


def test_the_report_has_a_row_for_each_stage_with_one_in_registry_order():
    described = [name for name, s in STAGES.items() if s.row is not None]
    assert described == ["prune", "swap", "finetune", "retrain"]
    reports = {
        "prune": {"plan": {"units": {"conv1": [0, 3]}}, "accuracy_before": {"linear_acc": 0.9},
                  "accuracy_after": {"linear_acc": 0.8}, "changes": {"params_before": 10, "params_after": 8}},
        "finetune": {"config": {"policy": "last", "source": "pruned"}, "layers": ["conv7", "conv8"],
                     "accuracy_before": {"linear_acc": 0.8}, "accuracy_after": {"linear_acc": 0.85}},
    }
    rows = [STAGES[n].row(reports[n]) for n in described if n in reports]  # type: ignore[misc]
    text = format_report({"reload": []}, rows)
    assert "| prune | conv1 (2) | 0.9000 | 0.8000 | 10 | 8 |" in text
    assert "| finetune (last, from pruned) | conv7, conv8 | 0.8000 | 0.8500 |  |  |" in text
    assert text.index("| prune |") < text.index("| finetune (")


@pytest.mark.parametrize(("stages", "message"), [
    (["finetune", "prune"], r"not in pipeline order .*write \['prune', 'finetune'\]"),
    (["report", "report"], r"names a stage twice; write \['report'\]"),
    (["prnue"], r"unknown stage 'prnue'\. Did you mean 'prune'"),
    (["swap"], r"no surgery\.swap section"),
])
def test_stage_lists_follow_the_registry(stages, message):
    cfg = from_dict(RunConfig, {"surgery": {"stages": stages, "prune": {"ratio": 0.1}, "finetune": {}}})
    with pytest.raises(ConfigError, match=message):
        check_recipe(cfg)


def test_a_stage_list_in_registry_order_is_accepted():
    check_recipe(from_dict(RunConfig, {"surgery": {"stages": ["score", "prune", "finetune", "report"],
                                                   "prune": {"ratio": 0.1}, "finetune": {}}}))
