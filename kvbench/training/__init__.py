"""Training the learned scorers (Fast KVzip gates, KVzap surrogates), the LLM itself frozen.

``corpus`` assembles the training text (by default text every Python install carries, disjoint from
every evaluation task); ``targets`` cuts it into texts and collects their attention inputs and KVzip
targets (forward passes only); ``fit`` fits the gates or surrogates, checkpointing as it goes, and
validates them against KVzip's kept set; ``train`` is the command that does it all at a recipe
(``--budget``) and writes the weights with their provenance.
"""

from kvbench.training.corpus import Corpus, python_corpus, read_corpus
from kvbench.training.fit import (Checkpoints, FitLog, TrainingInterrupted, agreement, fit_gates, fit_linear,
                                  fit_mlp)
from kvbench.training.targets import TextFeatures, chat_flags, collect, token_windows
from kvbench.training.train import BUDGETS, Recipe, TrainConfig, preset, train

__all__ = ["BUDGETS", "Checkpoints", "Corpus", "FitLog", "Recipe", "TextFeatures", "TrainConfig",
           "TrainingInterrupted", "agreement", "chat_flags", "collect", "fit_gates", "fit_linear", "fit_mlp",
           "preset", "python_corpus", "read_corpus", "token_windows", "train"]
