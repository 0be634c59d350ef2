"""SlideCache: bounded LRU, same object per path, fresh after fork."""

from __future__ import annotations

import pickle
import shutil

import pytest

from wsi_lightning.errors import ConfigError
from wsi_lightning.slides import SlideCache


@pytest.fixture()
def three_slides(tmp_path, pattern_slide):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"s{i}.tiff")
        shutil.copy(pattern_slide, paths[-1])
    return paths


def test_same_object_and_lru_eviction(three_slides):
    a, b, c = three_slides
    cache = SlideCache(max_open=2)
    ra = cache.get(a)
    assert cache.get(str(a)) is ra and len(cache) == 1
    rb = cache.get(b)
    cache.get(a)  # a is now the most recent
    rc = cache.get(c)  # evicts b, the least recently used
    assert len(cache) == 2
    assert rb._fast is None and rb._osr is None  # b was closed
    assert cache.get(a) is ra and cache.get(c) is rc
    assert cache.get(b) is not rb  # reopened
    cache.clear()
    assert len(cache) == 0 and ra._fast is None


def test_mpp_override_is_part_of_the_key(three_slides):
    cache = SlideCache()
    assert cache.get(three_slides[0], mpp=0.25).mpp == 0.25
    assert cache.get(three_slides[0]).mpp == 0.5


def test_new_process_starts_empty_without_closing(three_slides):
    cache = SlideCache()
    parent_reader = cache.get(three_slides[0])
    cache._pid = -1  # as if this process were a forked child of the one that filled it
    child_reader = cache.get(three_slides[0])
    assert child_reader is not parent_reader
    assert len(cache) == 1
    assert parent_reader._fast is not None  # the inherited handle was not closed
    assert parent_reader.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)


def test_pickles_empty(three_slides):
    cache = SlideCache(max_open=3)
    cache.get(three_slides[0])
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone) == 0 and clone.max_open == 3


def test_bad_size():
    with pytest.raises(ConfigError):
        SlideCache(max_open=0)
