"""Model families: how memsurgery recognises an encoder, wherever it sits, and names its layers.

A family is recognised by the TYPES and STRUCTURE of its modules, never by the class name of the
model the user passes: torchvision / timm ResNets by their residual blocks, timm ViTs by their
transformer blocks, memsurgery's ResNet9 by its class. The family's root is found anywhere in the
module tree: the model itself, ``nn.Sequential(*list(resnet.children())[:-1])``, a ``.backbone``
attribute of a lightly / solo-learn module, or inside DDP / DataParallel / ``torch.compile`` /
FSDP wrappers.

Every family also names the layers it finds (:class:`LayerNames`): a *tag* is the name a user
reads (``layer4.1``, ``blocks.3.ls1``, ``conv8``), the *path* the dotted ``named_modules()`` path
hooks attach to. For a plain model the two are equal. Under a wrapper the tag drops the prefix
of the family root (``backbone.``) and, for a Sequential of children, gives the children their
reference names (``4.1`` -> ``layer1.1``, ``2`` -> ``relu``). ``overrides`` renames any module.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from ._registry import Registry

INPUT_SUFFIX = ":input"
# segments that wrappers insert into module paths (FSDP, activation checkpointing, compile)
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / FSDP (``.module``) and torch.compile
    (``._orig_mod``)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_fsdp(model):
            inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def _is_fsdp(model: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FullyShardedDataParallel", None) if fsdp is not None else None
    return cls is not None and isinstance(model, cls)


# ---------------------------------------------------------------- recognising blocks
def is_resnet_block(m: nn.Module) -> bool:
    """A residual block of a torchvision / timm / lightly ResNet (BasicBlock or Bottleneck):
    ``conv1``, ``bn1``, ``conv2`` and a shortcut attribute (``downsample`` or ``shortcut``)."""
    return (isinstance(getattr(m, "conv1", None), nn.Conv2d) and isinstance(getattr(m, "conv2", None), nn.Conv2d)
            and isinstance(getattr(m, "bn1", None), nn.Module)
            and (hasattr(m, "downsample") or hasattr(m, "shortcut")))


def is_vit_block(m: nn.Module) -> bool:
    """A pre-norm transformer block (timm ``Block`` and its relatives): ``norm1``, ``attn``,
    ``norm2`` and an ``mlp`` with ``fc1`` / ``fc2``."""
    mlp = getattr(m, "mlp", None)
    return (all(isinstance(getattr(m, a, None), nn.Module) for a in ("norm1", "attn", "norm2"))
            and isinstance(mlp, nn.Module) and hasattr(mlp, "fc1") and hasattr(mlp, "fc2"))


def _containers(root: nn.Module, is_block: Callable[[nn.Module], bool]) -> list[str]:
    """Direct children of ``root`` whose children are all blocks (ResNet stages, ViT ``blocks``)."""
    out = []
    for name, child in root.named_children():
        kids = list(child.children())
        if kids and isinstance(child, (nn.Sequential, nn.ModuleList)) and all(is_block(k) for k in kids):
            out.append(name)
    return out


def _is_resnet9(m: nn.Module) -> bool:
    from .models.resnet9 import ResNet9

    return isinstance(m, ResNet9)


def _is_resnet_root(m: nn.Module) -> bool:
    return not is_resnet_block(m) and len(_containers(m, is_resnet_block)) >= 2


def _is_vit_root(m: nn.Module) -> bool:
    return len(_containers(m, is_vit_block)) == 1


# ---------------------------------------------------------------- reference names of children
_ACT = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish, nn.Mish, nn.ELU)
_POOL = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)


def _positional(name: str) -> bool:
    return name.isdigit()


def _resnet_child_names(root: nn.Module) -> dict[str, str]:
    """torchvision's names for the children of a ResNet given as a Sequential of its children:
    ``conv1 bn1 relu maxpool layer1..layerN avgpool flatten fc``. Named children keep their names."""
    stages = set(_containers(root, is_resnet_block))
    out: dict[str, str] = {}
    seen_stage = False
    n_stage = 0
    taken: set[str] = set()
    for name, child in root.named_children():
        if not _positional(name):
            out[name] = name
            continue
        if name in stages:
            n_stage += 1
            seen_stage = True
            canon = f"layer{n_stage}"
        elif not seen_stage:
            canon = ("conv1" if isinstance(child, nn.Conv2d) else "bn1" if isinstance(child, nn.BatchNorm2d)
                     else "relu" if isinstance(child, _ACT) else "maxpool" if isinstance(child, nn.MaxPool2d) else name)
        else:
            canon = ("avgpool" if isinstance(child, _POOL) or type(child).__name__ == "SelectAdaptivePool2d"
                     else "flatten" if isinstance(child, nn.Flatten) else "fc" if isinstance(child, nn.Linear) else name)
        out[name] = canon if canon not in taken else name
        taken.add(out[name])
    return out


def _vit_child_names(root: nn.Module) -> dict[str, str]:
    blocks = _containers(root, is_vit_block)
    return {name: ("blocks" if name in blocks and _positional(name) else name) for name, _ in root.named_children()}


def _identity_names(root: nn.Module) -> dict[str, str]:
    return {name: name for name, _ in root.named_children()}


# ---------------------------------------------------------------- families
@dataclass(frozen=True)
class Family:
    """One model family: how to recognise its root module, what its children are called, its
    layer presets (functions of the model's :class:`LayerNames` that return tags, and optional
    ΔLayerMem predecessors), the LayerMem / UnitMem defaults (``auto`` / ``auto-units``) and the
    layers fine-tuning chooses from."""

    name: str
    description: str
    is_root: Callable[[nn.Module], bool]
    child_names: Callable[[nn.Module], dict[str, str]]
    presets: Mapping[str, Callable[[LayerNames, Found], tuple[list[str], dict[str, str | None] | None]]]
    layer_preset: str
    unit_preset: str
    finetune_preset: str
    doc: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Found:
    """A family root inside a model: its family, dotted path (``""``: the model itself) and module."""

    family: Family
    path: str
    module: nn.Module

    def child_path(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name


_FAMILIES: Registry[Callable[[], Family]] = Registry("model family")
_BUILT: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add a family (recognised before the built-in ones that come later in registration order)."""
    _FAMILIES.register(family.name)(lambda: family)
    _BUILT[family.name] = family
    return family


def list_families() -> list[str]:
    return list(_BUILT)


def get_family(name: str) -> Family:
    return _FAMILIES.get(name)()


def find_families(model: nn.Module) -> list[Found]:
    """Every family root in ``model`` (outermost first, in ``named_modules()`` order); a root's
    own submodules are not searched again."""
    model = unwrap_model(model)
    found: list[Found] = []
    for path, module in model.named_modules():
        if any(path == f.path or f.path == "" or path.startswith(f.path + ".") for f in found):
            continue
        for fam in _BUILT.values():
            if fam.is_root(module):
                found.append(Found(fam, path, module))
                break
    return found


def find_family(model: nn.Module) -> Found | None:
    """The one family root of ``model``, or None. Several roots (e.g. a DINO module holding a
    student and a teacher backbone) raise: pass the encoder you train."""
    found = find_families(model)
    if len(found) > 1:
        where = ", ".join(f"{f.path or '<model>'} ({f.family.name})" for f in found)
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} holds {len(found)} encoders: {where}. Pass the one you "
            f"train, e.g. model.{found[0].path}, or select layers by name"
        )
    return found[0] if found else None


def family_name(model: nn.Module) -> str:
    """The family of ``model`` (``"resnet9"``, ``"resnet"``, ``"vit"``) or ``"unknown"``."""
    try:
        found = find_family(model)
    except ValueError:
        return "ambiguous"
    return found.family.name if found is not None else "unknown"


# ---------------------------------------------------------------- readable names
def _strip_wrappers(path: str) -> str:
    return ".".join(p for p in path.split(".") if p not in WRAPPER_SEGMENTS)


class LayerNames:
    """Readable names (tags) of a model's modules and their dotted paths, both ways.

    Args:
        model: the encoder (wrappers are unwrapped).
        overrides: ``{path or tag: new tag}`` to rename layers.

    Example:
        >>> names = LayerNames(nn.Sequential(*list(resnet18().children())[:-1]))
        >>> names.tag("7.1"), names.path("layer4.1")
        ('layer4.1', '7.1')
    """

    def __init__(self, model: nn.Module, overrides: Mapping[str, str] | None = None) -> None:
        self.model = unwrap_model(model)
        self.found = find_families(self.model)
        self.paths = [n for n, _ in self.model.named_modules() if n]
        single = len(self.found) == 1
        canon = {f.path: f.family.child_names(f.module) for f in self.found}
        tags: dict[str, str] = {}
        for p in self.paths:
            tags[p] = self._tag(p, canon, single)
        counts: dict[str, int] = {}
        for t in tags.values():
            counts[t] = counts.get(t, 0) + 1
        self.tag_of = {p: (t if counts[t] == 1 and t else p) for p, t in tags.items()}
        if overrides:
            self._apply(overrides)
        self.path_of = {t: p for p, t in self.tag_of.items()}

    def _tag(self, p: str, canon: Mapping[str, Mapping[str, str]], single: bool) -> str:
        for f in self.found:
            if f.path and not p.startswith(f.path + ".") and p != f.path:
                continue
            if p == f.path:
                return _strip_wrappers(p) if not single else ""
            rel = p[len(f.path) + 1:] if f.path else p
            head, _, rest = rel.partition(".")
            head = canon[f.path].get(head, head)
            inner = _strip_wrappers(head + ("." + rest if rest else ""))
            return inner if single or not f.path else f"{_strip_wrappers(f.path)}.{inner}"
        return _strip_wrappers(p)

    def _apply(self, overrides: Mapping[str, str]) -> None:
        by_tag = {t: p for p, t in self.tag_of.items()}
        for key, new in overrides.items():
            if not isinstance(new, str) or not new:
                raise ValueError(f"layer_names maps {key!r} to {new!r}; give a non-empty string")
            path = key if key in self.tag_of else by_tag.get(key)
            if path is None:
                raise ValueError(f"layer_names renames {key!r}, which is not a layer of "
                                 f"{type(self.model).__name__}.{close_names(key, list(by_tag))}")
            self.tag_of[path] = new
        seen: dict[str, str] = {}
        for p, t in self.tag_of.items():
            if t in seen:
                raise ValueError(f"layer_names gives two layers the name {t!r} ({seen[t]} and {p}); names must be unique")
            seen[t] = p

    @property
    def tags(self) -> list[str]:
        return [self.tag_of[p] for p in self.paths]

    def tag(self, path: str) -> str:
        """The tag of a path (``:input`` suffix kept)."""
        base, suffix = _split(path)
        return self.tag_of.get(base, base) + suffix

    def path(self, name: str) -> str | None:
        """The path of a tag or a path (``:input`` suffix kept), or None when neither."""
        base, suffix = _split(name)
        if base in self.path_of:
            return self.path_of[base] + suffix
        return base + suffix if base in self.tag_of else None

    def renamed(self) -> bool:
        return any(p != t for p, t in self.tag_of.items())

    def example_patterns(self) -> list[str]:
        """Wildcard selections that fit this model (containers with several children)."""
        out = []
        for t in self.tags:
            if t.count(".") == 0:
                module = self.model.get_submodule(self.path_of[t])
                if len(list(module.children())) >= 2:
                    out.append(f"{t}.*")
        return out[:3] or self.tags[:3]


def _split(name: str) -> tuple[str, str]:
    return (name[: -len(INPUT_SUFFIX)], INPUT_SUFFIX) if name.endswith(INPUT_SUFFIX) else (name, "")


def close_names(name: str, candidates: Sequence[str]) -> str:
    """`` Closest valid names: a, b.`` (or ``""``)."""
    import fnmatch

    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if not close:
        close = [c for c in candidates if fnmatch.fnmatch(c, f"*{name.split('.')[-1]}*")][:5]
    return f" Closest valid names: {', '.join(close)}." if close else ""


# ---------------------------------------------------------------- the built-in families
def _tags(names: LayerNames, found: Found, rels: Iterable[str]) -> list[str]:
    return [names.tag(found.child_path(r)) for r in rels]


def _stages(found: Found) -> list[str]:
    return _containers(found.module, is_resnet_block)


def _stem(found: Found) -> str | None:
    """The stem's activation (the child run just before the first stage), if it is a module."""
    stem = None
    for name, child in found.module.named_children():
        if name in _stages(found):
            break
        if isinstance(child, _ACT):
            stem = name
    return stem


def _resnet_stages(names: LayerNames, found: Found) -> tuple[list[str], None]:
    stem = _stem(found)
    return _tags(names, found, ([stem] if stem else []) + _stages(found)), None


def _resnet_blocks(names: LayerNames, found: Found) -> tuple[list[str], None]:
    stem = _stem(found)
    blocks = [f"{s}.{b}" for s in _stages(found) for b, _ in found.module.get_submodule(s).named_children()]
    return _tags(names, found, ([stem] if stem else []) + blocks), None


def _resnet_block_list(names: LayerNames, found: Found) -> tuple[list[str], None]:
    blocks = [f"{s}.{b}" for s in _stages(found) for b, _ in found.module.get_submodule(s).named_children()]
    return _tags(names, found, blocks), None


def _vit_blocks_rel(found: Found) -> list[str]:
    (container,) = _containers(found.module, is_vit_block)
    return [f"{container}.{b}" for b, _ in found.module.get_submodule(container).named_children()]


def _vit(names: LayerNames, found: Found) -> tuple[list[str], dict[str, str | None]]:
    out: list[str] = []
    parents: dict[str, str | None] = {}
    prev: str | None = None
    for b in _vit_blocks_rel(found):
        block = found.module.get_submodule(b)
        att_rel, fc_rel = (f"{b}.ls1", f"{b}.ls2") if hasattr(block, "ls1") and hasattr(block, "ls2") else (f"{b}.attn", f"{b}.mlp")
        att, fc, blk = _tags(names, found, (att_rel, fc_rel, b))
        res = names.tag(found.child_path(f"{b}.norm2")) + INPUT_SUFFIX
        out += [att, res, fc, blk]
        parents.update({att: prev, res: prev, fc: res, blk: prev})
        prev = blk
    norm = _final_norm(found)
    if norm is not None:  # the encoder's output (METRICS.md §2): every token after the final norm
        (tag,) = _tags(names, found, [norm])
        out.append(tag)
        parents[tag] = prev
    return out, parents


def _final_norm(found: Found) -> str | None:
    """The ViT's final norm over all tokens (timm's ``norm``; absent, or an Identity when timm
    pools first and normalizes the pooled token with ``fc_norm``)."""
    norm = getattr(found.module, "norm", None)
    return "norm" if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None


def _vit_block_list(names: LayerNames, found: Found) -> tuple[list[str], None]:
    return _tags(names, found, _vit_blocks_rel(found)), None


def _vit_mlp(names: LayerNames, found: Found) -> tuple[list[str], None]:
    rels = []
    for b in _vit_blocks_rel(found):
        act = found.module.get_submodule(b).mlp
        rels.append(f"{b}.mlp.act" if hasattr(act, "act") else f"{b}.mlp.fc1")
    return _tags(names, found, rels), None


_R9_POINTS = ("conv1", "conv2", "conv3", "conv4", "res2", "conv5", "conv6", "conv7", "conv8", "res6")


def _resnet9(names: LayerNames, found: Found) -> tuple[list[str], None]:
    return _tags(names, found, _R9_POINTS), None


def _resnet9_units(names: LayerNames, found: Found) -> tuple[list[str], None]:
    return _tags(names, found, [f"conv{i}" for i in range(1, 9)]), None


register_family(Family(
    "resnet9", "memsurgery's ResNet9 (the papers' model)", _is_resnet9, _identity_names,
    {"resnet9": _resnet9, "resnet9-units": _resnet9_units}, "resnet9", "resnet9-units", "resnet9-units",
    {"resnet9": "the paper's Table 1 points: conv 1-4, Res2, conv 5-8, Res6 (forward order)",
     "resnet9-units": "the eight post-ReLU conv stages (UnitMem units: their channels)"},
))
register_family(Family(
    "resnet", "torchvision / timm / lightly ResNets (BasicBlock, Bottleneck)", _is_resnet_root, _resnet_child_names,
    {"resnet-stages": _resnet_stages, "resnet-blocks": _resnet_blocks, "resnet-block-list": _resnet_block_list},
    "resnet-blocks", "resnet-blocks", "resnet-block-list",
    {"resnet-stages": "the stem activation (before max pooling) and every stage's output",
     "resnet-blocks": "the stem activation and every residual block's output (post-add activation)",
     "resnet-block-list": "every residual block's output (the fine-tuning candidates)"},
))
register_family(Family(
    "vit", "timm Vision Transformers (and blocks with norm1 / attn / norm2 / mlp)", _is_vit_root, _vit_child_names,
    {"vit": _vit, "vit-blocks": _vit_block_list, "vit-mlp": _vit_mlp}, "vit", "vit-mlp", "vit-blocks",
    {"vit": "four points per block (METRICS.md §3): attention output before its residual add (ls1), the "
            "residual sum after attention (input of norm2), MLP output before its residual add (ls2), block output; "
            "then the final norm (the encoder's output, all tokens)",
     "vit-blocks": "every block's output", "vit-mlp": "MLP hidden neurons (post-activation mlp.act), for UnitMem"},
))


def family_presets() -> dict[str, Family]:
    """Preset name -> the family that defines it."""
    return {p: fam for fam in _BUILT.values() for p in fam.presets}


__all__ = [
    "Family",
    "Found",
    "LayerNames",
    "family_name",
    "family_presets",
    "find_families",
    "find_family",
    "get_family",
    "is_resnet_block",
    "is_vit_block",
    "list_families",
    "register_family",
    "unwrap_model",
]
