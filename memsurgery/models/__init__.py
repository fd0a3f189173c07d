"""Encoders: the papers' ResNet9, torchvision ResNets and timm ViTs, built by name.

``build_encoder(name, **kwargs)`` returns an encoder whose ``forward`` gives features (no
classification head). torchvision and timm are imported lazily, when such a model is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .._registry import Registry
from .resnet9 import ResNet9

_ENCODERS: Registry[Callable[..., nn.Module]] = Registry("encoder")
register_encoder = _ENCODERS.register
list_encoders = _ENCODERS.names


def build_encoder(name: str, *, opacus_fix: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered encoder (``list_encoders()``) with its constructor arguments.

    ``opacus_fix=True`` makes it DP-compatible with Opacus' ``ModuleValidator.fix`` (BatchNorm ->
    GroupNorm); an exported model records it in its architecture, so ``load_model`` rebuilds it."""
    model = _ENCODERS.get(name)(**kwargs)
    if opacus_fix:
        from ..dp import make_dp_compatible

        model = make_dp_compatible(model)
    return model


@register_encoder("resnet9")
def _resnet9(in_channels: int = 3, num_classes: int = 0) -> nn.Module:
    return ResNet9(in_channels=in_channels, num_classes=num_classes)


def _torchvision_resnet(arch: str, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if cifar_stem or in_channels != 3:
        # small images: 3x3 stride-1 stem without max pooling (the usual CIFAR variant)
        k, s, p = (3, 1, 1) if cifar_stem else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=k, stride=s, padding=p, bias=False)
        if cifar_stem:
            model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


for _arch in ("resnet18", "resnet34", "resnet50"):
    register_encoder(_arch)(lambda _a=_arch, **kw: _torchvision_resnet(_a, **kw))


def _timm_vit(size: str, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    import timm

    return timm.create_model(
        f"vit_{size}_patch16_224", pretrained=False, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, num_classes=0, **kwargs,
    )


for _size in ("tiny", "small", "base"):
    register_encoder(f"vit_{_size}")(lambda _s=_size, **kw: _timm_vit(_s, **kw))


__all__ = ["ResNet9", "build_encoder", "list_encoders", "register_encoder"]
