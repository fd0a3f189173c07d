from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def _memsurgery_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def count_hooks():
    return _memsurgery_hooks


@pytest.fixture
def resnet9():
    from memsurgery.models import build_encoder

    torch.manual_seed(0)
    return build_encoder("resnet9")


@pytest.fixture
def tiny_vit():
    from memsurgery.models import build_encoder

    torch.manual_seed(0)
    return build_encoder("vit_tiny", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
