"""The run folder: the files a recipe's training and stages read and write, and their provenance.

Every stage reads and writes files in the recipe's output folder, so each also runs alone from
the CLI (``memsurgery prune recipe.yaml`` after ``memsurgery run`` or ``memsurgery score``):

==================  ======================================================================
``f.safetensors``   the trained encoder f (``g.safetensors``: its twin), written by training
``split.json``      the twin split
``scores.json``     UnitMem / ClassMem per unit, LayerMem / ΔLayerMem per layer (``score``)
``<stage>.safetensors``  the model each surgery stage produced (``pruned``, ``swapped``,
                    ``finetuned``), with the plan, the scores and the options in its metadata
``reports/<stage>.json``  what the stage changed and the accuracies before / after
``report.md``       every stage's report, and a reload check of every exported model
==================  ======================================================================

Every artefact records the digests of its inputs (``provenance``: the recipe's digest, the split,
the models it was made from); every stage checks them with :meth:`RunFolder.require` before it
runs, so a folder that mixes two runs, or holds a stale file, is refused with the command that
regenerates it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import remove_stale_tmp, sha256_files


# ---------------------------------------------------------------------------- helpers
def output_digest(model: nn.Module, inputs: torch.Tensor) -> str:
    """SHA-256 of the model's eval-mode output on ``inputs``: equal digests = bit-identical outputs."""
    from ..capture import probing

    with probing(model):
        out = model(inputs)
    return hashlib.sha256(out.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def digest_inputs(shape: tuple[int, ...], n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, *shape[1:]), generator=torch.Generator().manual_seed(seed))


class RunFolder:
    """The files of one recipe's output folder (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        remove_stale_tmp(self.root)  # what a killed write left (.f.safetensors.<random>.tmp)

    def model_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    @property
    def scores_path(self) -> Path:
        return self.root / "scores.json"

    @property
    def split_path(self) -> Path:
        return self.root / "split.json"

    def report_path(self, stage: str) -> Path:
        return self.root / "reports" / f"{stage}.json"

    # ------------------------------------------------------------------ provenance
    def digest(self, name: str) -> str:
        """The digest of a run artefact: a model's export digest (``memsurgery.digest``, which covers
        its weights and metadata; read from the header only), else the SHA-256 of the file's bytes
        (``split``, ``scores``). ``""`` when it does not exist."""
        path = {"split": self.split_path, "scores": self.scores_path}.get(name, self.model_path(name))
        if not path.is_file():
            return ""
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
            except Exception as e:  # SafetensorError: damaged
                raise ValueError(f"{path} is not a readable safetensors file ({e}): re-run the stage that writes it") from e
            if meta.get("memsurgery.digest"):
                return str(meta["memsurgery.digest"])
        return sha256_files([path])

    def provenance(self, *names: str, recipe: str) -> dict[str, str]:
        """``{"recipe": <digest>, name: <digest of that artefact now>, ...}``: what an artefact records."""
        return {"recipe": recipe, **{n: self.digest(n) for n in names}}

    def require(self, what: str, recorded: Mapping[str, Any] | None, current: Mapping[str, str], fix: str) -> None:
        """Refuse to use ``what`` when the inputs it recorded are not the ones in the folder now (a
        mixed or stale run folder), naming what differs and the command that regenerates it."""
        if not recorded:
            warnings.warn(f"{what} records no inputs (written by an older memsurgery): it cannot be checked against "
                          f"the other files of {self.root}; run `{fix}` to regenerate it with its provenance",
                          UserWarning, stacklevel=3)
            return
        for key, now in current.items():
            then = recorded.get(key)
            if then != now:
                label = {"recipe": "recipe (data, split, model, train, probe or monitor settings)",
                         "split": "split.json", "scores": "scores.json"}.get(key, f"{key}.safetensors")
                raise ValueError(
                    f"{what} was made from another {label} than the one of {self.root} now "
                    f"(recorded {str(then)[:12] or 'none'}…, now {now[:12] or 'missing'}…): the folder mixes two runs or "
                    f"{what} is stale. Run `{fix}` to regenerate it"
                )

    def load(self, name: str) -> tuple[nn.Module, dict[str, Any]]:
        from ..export import load_model

        path = self.model_path(name)
        if not path.exists():
            hint = {"f": "`memsurgery run <recipe>` (training writes f and g)", "g": "`memsurgery run <recipe>`"}
            raise FileNotFoundError(f"no model {name!r} at {path}: run {hint.get(name, f'the {name} stage')} first")
        return load_model(path)

    def save(self, name: str, model: nn.Module, meta: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Export ``model`` as ``<name>.safetensors`` with ``meta``'s architecture; returns what the
        report records (path, parameter count, output digest)."""
        from ..export import save_model

        shape = tuple(meta["input_shape"])
        path = save_model(model, self.model_path(name), arch=meta["arch"], input_shape=shape, **kwargs)
        return {"path": str(path.name), "params": sum(p.numel() for p in model.parameters()),
                "output_digest": output_digest(model, digest_inputs(shape))}
