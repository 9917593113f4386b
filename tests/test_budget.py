"""Shared selection mechanics against hand-worked cases: per-layer budgets, per-head floors."""

from __future__ import annotations

import pytest
import torch

from kvbench.core.budget import Budget, protect_top, select


def test_per_layer_budgets_keep_each_layers_own_count_per_head():
    scores = [torch.arange(10.0).expand(1, 2, 10), torch.arange(10.0).flip(0).expand(1, 2, 10)]
    first, second = select(scores, seen=10, budget=Budget(0.5, "uniform"), per_layer=[7, 3])
    assert first[0, 0].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8, 9]
    assert second[0, 1].nonzero().flatten().tolist() == [0, 1, 2]
    # layer allocation: the layer's heads share 2 x its budget
    skewed = torch.tensor([[[9.0, 8, 7, 6, 5], [0.1, 0.2, 0.3, 0.4, 0.5]]])
    (mask,) = select([skewed], seen=5, budget=Budget(0.0, "layer"), per_layer=[2])
    assert mask[0].sum(-1).tolist() == [4, 0]
    with pytest.raises(ValueError):
        select(scores, seen=10, budget=Budget(0.5, "global"), per_layer=[7, 3])


def test_per_head_floor_keeps_each_heads_best_under_a_shared_budget():
    skewed = torch.tensor([[[9.0, 8, 7, 6, 5], [0.1, 0.2, 0.3, 0.4, 0.5]]])
    floored = protect_top(skewed, 1)
    assert torch.isinf(floored).sum().item() == 2 and floored[0, 1, 4] == float("inf")
    (mask,) = select([floored], seen=5, budget=Budget(0.6, "layer"))  # 2 per head, 4 in the layer
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert mask[0, 1].nonzero().flatten().tolist() == [4]
    assert torch.equal(protect_top(skewed, 0), skewed)
