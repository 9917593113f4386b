"""KVzap's surrogate scores cut to a fixed ratio: kvbench's extension, so KVzap sits in ratio sweeps.

The KVzap paper evicts by a threshold on the predicted log KVzip+ (``kvzap``), which leaves the ratio
to the input. This variant ranks the same scores and keeps the best under ``--ratio`` with one
global budget. As in the paper's rule, the 128-token sliding window — and the sinks and template
prefix kvbench protects — stay outside the rule: the ratio is the share evicted of the *other*
entries, so the measured ratio is a little lower than the requested one (by ratio × protected /
tokens seen). Same surrogates and fields as ``kvzap``, minus the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.core.budget import Budget, select
from kvbench.core.method import register_method
from kvbench.methods.kvzap import SurrogateScores


@register_method
@dataclass
class KVzapRatio(SurrogateScores):
    name = "kvzap_ratio"

    def keep_masks(self, scores: list[torch.Tensor], seen: int, budget: Budget) -> list[torch.Tensor]:
        # protected entries (+inf) are the same count in every head: sinks, prefix, window
        outside = int(torch.isposinf(scores[0][0, 0]).sum())
        return select(scores, seen, budget, outside=outside)
