"""Shared selection mechanics against hand-worked cases: per-layer budgets, per-head floors, protected
sinks and recent tokens in padded layouts, entries kept outside the budget."""

from __future__ import annotations

import pytest
import torch

from kvbench.core.budget import Budget, protect, protect_top, select


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


def test_recent_tokens_are_counted_among_real_entries_of_a_padded_head():
    """After a global eviction a layer is padded to its fullest head and new tokens go after the
    padding: a head's 3 most recent tokens are its 2 new entries and its last real one before the pad."""
    inf = float("inf")
    scores = torch.zeros(1, 2, 7)
    valid = torch.tensor([[[True, True, True, True, True, True, True],
                           [True, True, True, False, False, True, True]]])
    got = protect(scores, first=1, last=3, valid=valid)
    assert got[0, 0].tolist() == [inf, 0, 0, 0, inf, inf, inf]
    assert got[0, 1].tolist() == [inf, 0, inf, -inf, -inf, inf, inf]
    # without padding the last slots are the recent tokens
    assert protect(scores, first=0, last=2)[0, 0].tolist() == [0, 0, 0, 0, 0, inf, inf]


def test_entries_kept_outside_the_budget_leave_the_ratio_to_the_others():
    """10 tokens, 3 protected per head (1 sink, 2 recent): ratio 0.5 of the other 7 evicts 4 (rounded as
    everywhere), keeping 3 of them."""
    scores = protect(torch.tensor([[[0.0, 9, 1, 8, 2, 7, 3, 6, 4, 5]]]), first=1, last=2)
    (mask,) = select([scores], seen=10, budget=Budget(0.5, "global"), outside=3)
    assert mask[0, 0].nonzero().flatten().tolist() == [0, 1, 3, 5, 8, 9]
    (inside,) = select([scores], seen=10, budget=Budget(0.5, "global"))  # protected ones count in the budget
    assert inside[0, 0].nonzero().flatten().tolist() == [0, 1, 3, 8, 9]
