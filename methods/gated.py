"""Fast KVzip (Kim, Han and Yun, 2026): a small learned gate per layer predicts KVzip's score.

Each layer's gate reads a token's attention input (after the input norm, before RoPE) and scores the
token's KV entry against 16 learned sink keys per KV head (:class:`SinkGate`): the score
depends on the token alone, so new chunks and decoded tokens are scored as they arrive, with no extra
forward pass. Gates are trained on KVzip's scores (``kvbench train gated``); those of the default
model and gemma3-270m ship with kvbench. Defaults follow the reference: one global threshold over all layers and heads, and
the 4 sinks, the chat template's prefix and a recent window kept. The window is counted in tokens, as
the reference picks it: after prefill 2% of the tokens seen, or 4,096 once they fill more than one of
the reference's 16,000-token prefill chunks (``prefill/model/wrapper.py``); while decoding the most
recent 128 (``math/run_math.py``: ``window_size=128``).

Decoding: the reference buffers 128 new tokens' attention inputs and scores them together every 128
tokens of the cache (``divide_length=128``). A gate scores each token from its own input alone, so
kvbench scores every token inside its forward (same scores, no buffer) and evicts every
``--decode-interval`` generated tokens; ``--decode-interval 128`` evicts as often as the reference.

Weights, read without executing pickled code: the published gates (``Jang-Hyun/Fast-KVzip``,
``<model name, lower case>/q{G}_dim16_sink16.pt``, a ``torch.save`` of ``{"module": [state_dict per
layer], ...}`` with keys ``q_proj.weight (H·G·16, d)``, ``q_proj.bias (H·G·16)``, ``k_proj.weight
(H·16, d)``, ``q_norm.weight (16)``, ``k_norm.weight (16)``, ``k_base (H, 1, 16, 16)``, ``b (H, 1, G)``),
or kvbench's ``gated.safetensors`` holding the same tensors as ``layers.{i}.<key>`` — for the layers
eviction cuts, so a Gemma 3 file holds its global layers only; where they are looked for:
``kvbench.core.weights``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kvbench.core.method import Method, register_method
from kvbench.core.scoring import LayerView, token_scores
from kvbench.core.weights import (check_layer_indices, check_shape, hub_file, local_dirs, model_name,
                                  require_compressed_layers, train_hint, weights_reader)
from kvbench.errors import WeightsError

STATE = "gated"  # per-entry gate scores kept in the cache layer's state
GATE_REPO = "Jang-Hyun/Fast-KVzip"
SHIPPED = Path(__file__).resolve().parent / "weights"


@register_method
@dataclass
class Gated(Method):
    name = "gated"
    incremental = True

    weights: str | None = None  # gate file or folder; None: shipped, trained or published gates
    allocation: str = "global"
    window_ratio: float = 0.02  # recent window after prefill: this share of the tokens seen...
    window_size: int = 4096  # ...or this many once `long_context` tokens have been seen
    long_context: int = 16000  # the reference's prefill chunk: longer contexts get the fixed window
    decode_window: int = 128  # recent window while decoding

    def __post_init__(self) -> None:
        self._gates = None

    def hidden_window(self) -> None:
        return None  # every token's own attention input

    def protected_recent(self, seen: int, budget: int = 0, decoding: bool = False) -> int:
        if decoding:
            return min(self.decode_window, seen)
        return int(seen * self.window_ratio) if seen < self.long_context else min(self.window_size, seen)

    def setup(self, model, tokenizer=None) -> None:
        """Load the gates once the model is known: missing weights fail before any sample runs."""
        held = [i for i, gate in enumerate(self.gates(model.config)) if gate is not None]
        require_compressed_layers(model, held, f"the gates for {model_name(model.config)!r} hold no gate for")

    def gates(self, config):
        if self._gates is None:
            self._gates = load_gates(config, self.weights)
        return self._gates

    def score(self, view: LayerView) -> torch.Tensor:
        gate = self.gates(view.attn.config)[view.layer_idx]
        if gate.q_proj.weight.dtype != view.hidden.dtype or gate.q_proj.weight.device != view.hidden.device:
            # projections in the model's dtype, as the reference runs them (norms and softmax stay fp32)
            gate.to(view.hidden.device, view.hidden.dtype)
        return token_scores(view, STATE, gate(view.hidden))


def gate_file(config) -> str:
    group = config.num_attention_heads // config.num_key_value_heads
    return f"q{group}_dim16_sink16.pt"


class SinkGate(nn.Module):
    """One layer's Fast KVzip gate: a token's score against 16 learned sink keys per KV head.

    q = RMSNorm(W_q x + b_q) as H·G vectors of ``width``, k = RMSNorm(W_k x) as H vectors;
    logit ℓ_g = <k, q_g>/sqrt(width) + b_g, sink logits β_{s,g} = <k_s, q_g>/sqrt(width);
    score_g = e^ℓ / (e^ℓ + Σ_s e^β), averaged over the G query heads of the KV head.
    Parameter names are the published checkpoint's.
    """

    def __init__(self, input_dim: int, kv_heads: int, group: int, width: int = 16, sinks: int = 16,
                 eps: float = 1e-6):
        super().__init__()
        self.kv_heads, self.group, self.width, self.eps = kv_heads, group, width, eps
        self.q_proj = nn.Linear(input_dim, kv_heads * group * width, bias=True)
        self.k_proj = nn.Linear(input_dim, kv_heads * width, bias=False)
        self.q_norm = nn.Module()
        self.q_norm.weight = nn.Parameter(torch.ones(width))
        self.k_norm = nn.Module()
        self.k_norm.weight = nn.Parameter(torch.ones(width))
        self.k_base = nn.Parameter(torch.zeros(kv_heads, 1, sinks, width))
        self.b = nn.Parameter(torch.zeros(kv_heads, 1, group))

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.width,), weight.float(), self.eps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n, d)`` → log-odds of the score's softmax: ``(B, H, n, G, 1 + sinks)`` logits."""
        batch, n, _ = x.shape
        x = x.to(self.q_proj.weight.dtype)
        q = self._rms(self.q_proj(x).view(batch, n, self.kv_heads, self.group, self.width), self.q_norm.weight)
        k = self._rms(self.k_proj(x).view(batch, n, self.kv_heads, self.width), self.k_norm.weight)
        scale = 1.0 / math.sqrt(self.width)
        own = torch.einsum("bnhw,bnhgw->bhng", k, q) * scale + self.b.float().view(1, self.kv_heads, 1, self.group)
        sink = torch.einsum("hsw,bnhgw->bhngs", self.k_base.float()[:, 0], q) * scale
        return torch.cat([own.unsqueeze(-1), sink], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, H, n)`` in (0, 1), float32."""
        return self.logits(x).softmax(dim=-1)[..., 0].mean(dim=-1)


def gates_from_state(states: list[dict[str, torch.Tensor]] | dict[int, dict[str, torch.Tensor]], config,
                     source: str) -> list[SinkGate | None]:
    """Per-layer gates from state dicts in the published layout, checked against the model. A list
    (the published checkpoints) holds every layer; a dict may hold only the layers eviction cuts
    (Gemma 3's global layers: its sliding-window layers are never scored), the others are None."""
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    name = model_name(config)
    layers = config.num_hidden_layers
    if not isinstance(states, dict):
        check_shape(name, f"gates in {source} (layers)", (len(states),), (layers,))
        states = dict(enumerate(states))
    check_layer_indices(name, f"gates in {source}", states, layers)
    gates: list[SinkGate | None] = [None] * layers
    for index, state in states.items():
        width = state["q_norm.weight"].shape[-1]
        sinks = state["k_base"].shape[2]
        check_shape(name, f"gates in {source} (q_proj)", state["q_proj.weight"].shape,
               (kv_heads * group * width, config.hidden_size))
        gate = SinkGate(config.hidden_size, kv_heads, group, width, sinks)
        gate.load_state_dict({k: v.float() for k, v in state.items()})
        gates[index] = gate.eval().requires_grad_(False)
    return gates


@weights_reader("gates")
def read_gates(path: Path, config) -> list[SinkGate]:
    """A published ``.pt`` (read with ``weights_only=True``) or kvbench's ``gated.safetensors``."""
    if path.suffix == ".safetensors":
        flat = load_file(str(path))
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            index, _, param = key.removeprefix("layers.").partition(".")
            layers.setdefault(int(index), {})[param] = tensor
        states = layers
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing line
            raise WeightsError(f"cannot read gates from {path}: {type(exc).__name__}: not a gates checkpoint "
                               "that loads with weights_only=True") from exc
        states = checkpoint["module"] if isinstance(checkpoint, dict) else checkpoint
    return gates_from_state(states, config, str(path))


def write_gates(gates: list[SinkGate], path: Path, dtype: torch.dtype = torch.float16,
                layers: list[int] | None = None) -> None:
    """``gates[k]`` is written as layer ``layers[k]`` (default: layer ``k``)."""
    layers = list(range(len(gates))) if layers is None else layers
    tensors = {f"layers.{i}.{k}": v.detach().to(dtype).contiguous() for i, g in zip(layers, gates)
               for k, v in g.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_gates(config, path: str | os.PathLike | None = None) -> list[SinkGate]:
    """Gates for ``config``'s model from ``path`` or the usual places (see the module docstring)."""
    name = model_name(config)
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            candidates = [path / "gated.safetensors", path / gate_file(config)]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise WeightsError(f"no gates in {path} (looked for {', '.join(c.name for c in candidates)})")
            path = found[0]
        if not path.is_file():
            raise WeightsError(f"gate weights {path} do not exist")
        return read_gates(path, config)
    looked = []
    for folder in local_dirs(SHIPPED, name):
        candidate = folder / "gated.safetensors"
        looked.append(str(candidate))
        if candidate.is_file():
            return read_gates(candidate, config)
    hub_name = f"{name.lower()}/{gate_file(config)}"
    found, why = hub_file(GATE_REPO, hub_name) if name else (None, "the model has no name")
    if found is not None:
        return read_gates(found, config)
    raise WeightsError(
        f"no gated weights for model {name!r}: looked for {', '.join(looked)} and {GATE_REPO}/{hub_name} "
        f"on the Hugging Face hub ({why}); {train_hint('gated', config)}"
    )
