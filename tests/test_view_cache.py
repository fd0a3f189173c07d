"""The view cache: a second probe of the same points reuses their rendered views and gives the
same bits; changed images, other views and a full budget are rendered anew; nothing of a
user's in-place model reaches the cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memsurgery import Monitor, ProbeSet
from memsurgery.custom_views import CustomViews
from memsurgery.models import build_encoder
from memsurgery.probe import ProbeConfig, run_probe
from memsurgery.view_cache import ViewCache
from memsurgery.views import ViewConfig, make_many_views

CFG = {"num_pairs": 2, "num_unit_views": 4, "batch_size": 8, "progress": False}
N = 20  # points: 3 batches of 8, 8, 4


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return (torch.rand(N, 3, 16, 16, generator=g) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def twins():
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(build_encoder("resnet9").eval())
    return tuple(out)


def _probe(f, g, images, cache=None, **kw):
    return run_probe(f, images, range(len(images)), reference=g, config=ProbeConfig(**{**CFG, **kw}), view_cache=cache)


def _assert_equal(a, b):
    assert torch.equal(a.align_f, b.align_f) and torch.equal(a.align_g, b.align_g)
    assert torch.equal(a.sslmem, b.sslmem) and a.layermem == b.layermem
    for u in a.unitmem:
        assert torch.equal(a.unitmem[u].scores.nan_to_num(7.0), b.unitmem[u].scores.nan_to_num(7.0))


def test_a_second_probe_reuses_the_views_and_gives_the_same_bits(twins, images):
    plain = _probe(*twins, images)
    cache = ViewCache()
    first = _probe(*twins, images, cache)
    assert (cache.hits, cache.misses, len(cache)) == (0, 3, 3)
    second = _probe(*twins, images, cache)
    assert (cache.hits, cache.misses) == (3, 3)
    _assert_equal(first, plain)
    _assert_equal(second, plain)
    # what is kept is exactly what the renderer makes for each batch
    batch = torch.arange(8)
    kept = cache.get_or_render(ViewCache.key(images[batch], batch, range(4), ViewConfig(), torch.device("cpu")),
                               lambda: pytest.fail("batch 0 was not kept"))[0]
    want = make_many_views(images[batch].float() / 255, batch, range(4), ViewConfig())
    assert all(torch.equal(a, b) for a, b in zip(kept, want, strict=True))


def test_changed_images_other_views_and_other_points_miss(twins, images):
    cache = ViewCache()
    _probe(*twins, images, cache)
    changed = images.clone()
    changed[3] = 255 - changed[3]  # one image of the first batch, changed in place
    got = _probe(*twins, changed, cache)
    assert cache.hits == 2  # the other two batches
    _assert_equal(got, _probe(*twins, changed))
    other = _probe(*twins, images, cache, views=ViewConfig(seed=5))
    assert cache.hits == 2
    _assert_equal(other, _probe(*twins, images, views=ViewConfig(seed=5)))
    run_probe(twins[0], images, range(1, N), reference=twins[1], config=ProbeConfig(**CFG), view_cache=cache)
    assert cache.hits == 2  # shifted batches: other indices


def test_the_budget_keeps_what_fits_and_the_rest_is_rendered(twins, images):
    one_batch = 4 * 8 * 3 * 16 * 16 * 4  # 4 views of 8 images, float32
    cache = ViewCache(max_mb=1.4 * one_batch / 2**20)  # batch 0 fits; batch 2 (4 points) then not
    _probe(*twins, images, cache)
    assert len(cache) == 1 and cache.nbytes == one_batch
    _assert_equal(_probe(*twins, images, cache), _probe(*twins, images))
    assert cache.hits == 1  # the first batch, every probe
    empty = ViewCache(max_mb=0)
    _probe(*twins, images, empty)
    assert len(empty) == 0 and empty.nbytes == 0


def test_entries_unused_for_two_rounds_make_room():
    cache = ViewCache(max_mb=2 * 1024 / 2**20)  # two 1 KiB entries
    block = [torch.zeros(256)]
    for key in ("a", "b"):
        cache.get_or_render((key,), lambda: block)
    cache.new_round()
    cache.get_or_render(("a",), lambda: block)  # a is used again; b is not
    assert cache.get_or_render(("c",), lambda: block)[1] is False  # b is only one round old: kept, c not
    cache.new_round()
    cache.get_or_render(("a",), lambda: block)
    assert cache.get_or_render(("c",), lambda: block)[1] is True  # b (two rounds unused) made room
    assert {k[0] for k in cache._entries} == {"a", "c"}


def test_the_users_own_transform_is_rendered_every_time(twins, images):
    from torchvision.transforms import v2

    cache = ViewCache()
    custom = CustomViews(v2.RandomHorizontalFlip(), seed=0)
    _probe(*twins, images, cache, views=custom)
    assert len(cache) == 0 and cache.misses == 0


def test_a_model_that_changes_its_input_in_place_does_not_change_the_cache(images):
    class Scales(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x.mul_(0.5))

    torch.manual_seed(0)
    f, g = Scales(build_encoder("resnet9").eval()), Scales(build_encoder("resnet9").eval())
    kw = {"num_pairs": 1, "num_unit_views": 4, "layers": "body.*", "unit_layers": "body.conv1"}  # views 2, 3 alone
    plain = _probe(f, g, images, **kw)
    cache = ViewCache()
    for _ in range(2):
        got = _probe(f, g, images, cache, **kw)
        for u in plain.unitmem:
            assert torch.equal(got.unitmem[u].scores, plain.unitmem[u].scores)
    assert cache.hits == 3


def test_the_monitor_keeps_its_views_on_the_cpu_and_checks_its_budget(twins, images):
    probe = ProbeSet(images, torch.arange(12), {"extra": torch.arange(12, N)})
    cfg = ProbeConfig(**CFG)
    mon = Monitor(twins[0], probe, config=cfg)
    a = mon.compute()
    assert mon._view_cache is not None and len(mon._view_cache) == 3  # 2 candidate + 1 control batches
    b = mon.probe_now()
    assert mon._view_cache.hits == 3
    off = Monitor(twins[0], probe, config=cfg, view_cache_mb=0)
    assert off.compute() == a == b and len(off._view_cache) == 0
    with pytest.raises(ValueError, match="max_mb must be a number >= 0"):
        Monitor(twins[0], probe, config=cfg, view_cache_mb=-1)
