"""Attention logger with test-time bag sampling and cross-scale maps (CS-MIL)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from wsi_lightning.callbacks.attention_logger import AttentionLogger, _merge_bags
from wsi_lightning.data.batch import Bag


def test_merge_bags_averages_per_location():
    a = {"slide_id": "s", "attention": np.array([[0.5, 0.5]]), "coords": np.array([[0, 0], [10, 0]])}
    b = {"slide_id": "s", "attention": np.array([[0.2, 0.8]]), "coords": np.array([[10, 0], [20, 0]])}
    m = _merge_bags([a, b])
    assert m["coords"].tolist() == [[0, 0], [10, 0], [20, 0]]
    np.testing.assert_allclose(m["attention"][0], [0.5, (0.5 + 0.2) / 2, 0.8])


def test_cross_scale_scores_become_extra_maps():
    cb = AttentionLogger()
    cb._slides = []
    mask = torch.tensor([[True, True, False]])
    bag = Bag(torch.zeros(1, 3, 3, 4), mask, torch.tensor([[[0, 0], [5, 0], [-1, -1]]]), {}, ["s"])
    out = SimpleNamespace(attention=torch.tensor([[0.3, 0.7, 0.0]]), cross_scale=torch.arange(9.0).view(1, 3, 3))
    cb.on_test_batch_end(SimpleNamespace(is_global_zero=True), SimpleNamespace(last_output=out), None, bag, 0)
    att = cb._slides[0]["attention"]  # (1 + S, n)
    assert att.shape == (4, 2)
    np.testing.assert_allclose(att[0], [0.3, 0.7])
    np.testing.assert_allclose(att[1:], [[0, 3], [1, 4], [2, 5]])  # scale s of tile n = r[n, s]
