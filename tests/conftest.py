from __future__ import annotations

import atexit
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

torch.set_num_threads(2)


def _register_helpers() -> None:
    """Make the test helper files importable under pytest's importlib import mode: tests/_naive.py
    (deliberately naive reference implementations) as ``memsurgery_tests_naive``, tests/_wandb_read.py
    (an offline wandb run reader) as ``memsurgery_tests_wandb_read``."""
    for name, file in (("memsurgery_tests_naive", "_naive.py"), ("memsurgery_tests_wandb_read", "_wandb_read.py")):
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file))
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


_register_helpers()
# tests write only to temporary directories: no example database in the repository
settings.register_profile("memsurgery", database=None, deadline=None)
settings.load_profile("memsurgery")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="memsurgery-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)


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


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """A tiny ImageFolder of the digits (train/ 48 images, test/ 24), 32x32 RGB PNGs."""
    from memsurgery.data import demo_image_folder

    return demo_image_folder(tmp_path_factory.mktemp("digits-folder"), size=32, per_split=(48, 24))


@pytest.fixture(autouse=True)
def _no_tracker_state_between_tests():
    """wandb and MLflow keep process-wide state (a current run, the settings singleton, the
    tracking URI); each test starts without what an earlier one left."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        wandb.finish()
        wandb.teardown()
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()
