"""KVzap (Jegou et al., 2026): a per-layer surrogate predicts log KVzip+ from a token's attention input.

The surrogate (linear, or D→512→GELU→H_kv) maps each token's attention input to H_kv predicted log
KVzip+ scores, so tokens are scored as they arrive, in prefill and in decoding. Eviction is the
paper's (kvpress: ``DMSPress(KVzapPress(...), threshold=τ)``): an entry older than the 128-token
sliding window is evicted when its predicted score is below τ, and the compression ratio is measured,
not chosen. τ defaults to -4, the reference README's value (kvpress's leaderboard script runs -3 to -6
on Qwen3-8B and -6 to -9 on Llama-3.1-8B-Instruct; ``--threshold`` sets it). kvbench also keeps the 4
sinks and the chat template's prefix, as for every method; kvpress keeps neither (``sinks=0`` is its
rule exactly, bar the template prefix). A token's score depends on the token alone, so evicting
every ``--decode-interval`` tokens while decoding keeps what DMSPress keeps at every step, only later
(``--decode-interval 1`` is DMSPress's ``decoding=True``). The fixed-ratio variant is ``kvzap_ratio``.
Surrogates are trained with ``kvbench train kvzap``; those of the default model and gemma3-270m ship
with kvbench.

Surrogates, published as ``nvidia/KVzap-{linear,mlp}-<model name>``: a transformers folder with
``config.json`` (``input_dim``, ``output_dim``, ``hidden_dim`` (null for linear), ``n_modules``, and
kvbench's optional ``layer_indices``: the layers the modules predict, when not all of them) and
``model.safetensors`` (``layers.{i}.weight/bias``, or ``layers.{i}.0.*`` and ``layers.{i}.2.*`` for the
MLP); kvbench writes the same folder as ``kvzap-{kind}/``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView, token_scores
from kvbench.core.weights import (check_layer_indices, check_shape, hub_file, local_dirs, model_name,
                                  require_compressed_layers, train_hint, weights_reader)
from kvbench.errors import WeightsError

STATE = "kvzap"
KVZAP_REPO = "nvidia/KVzap-{kind}-{model}"
SHIPPED = Path(__file__).resolve().parent / "weights"


@dataclass
class SurrogateScores(Method):
    """KVzap's scoring, shared by ``kvzap`` (threshold) and ``kvzap_ratio`` (fixed ratio): each
    token's predicted log KVzip+, and the sliding window that no rule touches."""

    incremental = True

    kind: str = "mlp"  # the reference's default surrogate
    window_size: int = 128  # the sliding window never evicted (DMSPress's sliding_window_size)
    weights: str | None = None  # surrogate folder; None: shipped, trained or published
    allocation: str = "global"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "mlp"):
            raise ValueError(f"{self.name} kind must be 'linear' or 'mlp', not {self.kind!r}")
        self._surrogate = None

    def hidden_window(self) -> None:
        return None

    def protected_recent(self, seen: int, budget: int = 0, decoding: bool = False) -> int:
        return min(self.window_size, seen)

    def setup(self, model, tokenizer=None) -> None:
        """Load the surrogate once the model is known: missing weights fail before any sample runs."""
        require_compressed_layers(model, self.surrogate(model.config).layer_indices,
                                  f"the KVzap surrogate for {model_name(model.config)!r} has no module for")

    def surrogate(self, config):
        if self._surrogate is None:
            self._surrogate = load_surrogate(config, self.kind, self.weights)
        return self._surrogate

    def score(self, view: LayerView) -> torch.Tensor:
        model = self.surrogate(view.attn.config).to(view.hidden.device)
        return token_scores(view, STATE, model.layer(view.layer_idx, view.hidden))


@register_method
@dataclass
class KVzap(SurrogateScores):
    name = "kvzap"

    threshold: float = -4.0  # τ: evict entries outside the window whose predicted log KVzip+ is below it

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise ValueError(f"kvzap evicts below a threshold τ (the paper's -4), not {self.threshold!r}; "
                             "for a fixed ratio use kvzap_ratio")

    def keep_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Entries kept (``scores`` already protected: sinks, prefix and window at +inf)."""
        return scores >= self.threshold


class Surrogate(nn.Module):
    """KVzap's per-layer surrogates, the published ``KVzapModel`` layout: ``layers.{i}`` is a linear
    map or ``Linear → GELU → Linear`` from the attention input to H_kv predicted log KVzip+ scores."""

    def __init__(self, input_dim: int, output_dim: int, n_modules: int, hidden_dim: int | None = None,
                 layer_indices: list[int] | None = None):
        super().__init__()
        self.input_dim, self.output_dim, self.n_modules, self.hidden_dim = input_dim, output_dim, n_modules, hidden_dim
        # module k predicts layer layer_indices[k]: every layer, or only those eviction cuts (Gemma 3's global ones)
        self.layer_indices = list(range(n_modules)) if layer_indices is None else list(layer_indices)
        if len(self.layer_indices) != n_modules:
            raise ValueError(f"{n_modules} modules for {len(self.layer_indices)} layer indices")
        self._module_of = {layer: k for k, layer in enumerate(self.layer_indices)}
        if hidden_dim is None:
            self.layers = nn.ModuleList(nn.Linear(input_dim, output_dim) for _ in range(n_modules))
        else:
            self.layers = nn.ModuleList(
                nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, output_dim))
                for _ in range(n_modules)
            )

    @property
    def kind(self) -> str:
        return "linear" if self.hidden_dim is None else "mlp"

    def layer(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n, d)`` → predicted log KVzip+ ``(B, H, n)``, float32."""
        module = self.layers[self._module_of[index]]
        return module(x.to(next(module.parameters()).dtype)).float().transpose(1, 2)

    def config_dict(self) -> dict:
        return {"model_type": "kvzap", "input_dim": self.input_dim, "output_dim": self.output_dim,
                "hidden_dim": self.hidden_dim, "n_modules": self.n_modules, "layer_indices": self.layer_indices}


@weights_reader("a KVzap surrogate")
def read_surrogate(folder: Path, config) -> Surrogate:
    name = model_name(config)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read KVzap surrogate from {folder}: {str(exc).splitlines()[0]}") from exc
    indices = cfg.get("layer_indices")  # absent (the published layout): one module per layer
    if indices is None:
        check_shape(name, f"KVzap surrogate in {folder} (input_dim, output_dim, n_modules)",
               (cfg["input_dim"], cfg["output_dim"], cfg["n_modules"]),
               (config.hidden_size, config.num_key_value_heads, config.num_hidden_layers))
    else:
        check_shape(name, f"KVzap surrogate in {folder} (input_dim, output_dim)",
               (cfg["input_dim"], cfg["output_dim"]), (config.hidden_size, config.num_key_value_heads))
        check_layer_indices(name, f"KVzap surrogate in {folder}", indices, config.num_hidden_layers)
    model = Surrogate(cfg["input_dim"], cfg["output_dim"], cfg["n_modules"], cfg.get("hidden_dim"), indices)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)


def write_surrogate(model: Surrogate, folder: Path, dtype: torch.dtype = torch.float16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config_dict(), indent=2) + "\n")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))


def load_surrogate(config, kind: str, path: str | os.PathLike | None = None) -> Surrogate:
    """KVzap surrogates (``kind``: linear or mlp) from ``path`` or the usual places."""
    name = model_name(config)
    if path is not None:
        path = Path(path).expanduser()
        folder = path / f"kvzap-{kind}" if (path / f"kvzap-{kind}" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise WeightsError(f"no KVzap surrogate in {path} (looked for config.json and model.safetensors)")
        return read_surrogate(folder, config)
    looked = []
    for folder in local_dirs(SHIPPED, name):
        looked.append(str(folder / f"kvzap-{kind}"))
        if (folder / f"kvzap-{kind}" / "config.json").is_file():
            return read_surrogate(folder / f"kvzap-{kind}", config)
    repo = KVZAP_REPO.format(kind=kind, model=name)
    why = "the model has no name"
    if name:
        cfg, why = hub_file(repo, "config.json")
        if cfg is not None:
            weights, why = hub_file(repo, "model.safetensors")
            if weights is not None:
                return read_surrogate(cfg.parent, config)
    raise WeightsError(
        f"no KVzap {kind} weights for model {name!r}: looked for {', '.join(looked)} and {repo} on the "
        f"Hugging Face hub ({why}); {train_hint('kvzap', config, kind)}"
    )
