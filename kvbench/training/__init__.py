"""Training the learned scorers (Fast KVzip gates, KVzap surrogates), the LLM itself frozen.

``targets`` collects texts, their attention inputs and KVzip targets (forward passes only); ``fit``
fits the gates or surrogates and validates them against KVzip's kept set; ``train`` is the command
that does both and writes the weights with their provenance.
"""

from kvbench.training.fit import agreement, fit_gates, fit_linear, fit_mlp
from kvbench.training.targets import TextFeatures, collect, read_texts, token_windows
from kvbench.training.train import TrainConfig, train

__all__ = ["TextFeatures", "TrainConfig", "agreement", "collect", "fit_gates", "fit_linear", "fit_mlp",
           "read_texts", "token_windows", "train"]
