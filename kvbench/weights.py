"""Learned scorers' weights: Fast KVzip gates and KVzap surrogates, in their published formats.

Where weights come from, in order: a path the user gives (``--weights``); the files shipped with
kvbench for its default model (``methods/weights/<model>/``); what ``kvbench train`` wrote into the
kvbench cache; the authors' Hugging Face repos. Nothing found is one line naming every place looked
and the ``kvbench train`` command that makes them.

Formats (read without executing pickled code):

- gates, published: ``Jang-Hyun/Fast-KVzip``, ``<model name, lower case>/q{G}_dim16_sink16.pt``, a
  ``torch.save`` of ``{"module": [state_dict per layer], ...}`` with keys ``q_proj.weight (H·G·16, d)``,
  ``q_proj.bias (H·G·16)``, ``k_proj.weight (H·16, d)``, ``q_norm.weight (16)``, ``k_norm.weight (16)``,
  ``k_base (H, 1, 16, 16)``, ``b (H, 1, G)``; kvbench writes the same tensors to ``gated.safetensors``
  as ``layers.{i}.<key>``.
- surrogates, published: ``nvidia/KVzap-{linear,mlp}-<model name>``, a transformers folder with
  ``config.json`` (``input_dim``, ``output_dim``, ``hidden_dim`` (null for linear), ``n_modules``) and
  ``model.safetensors`` (``layers.{i}.weight/bias``, or ``layers.{i}.0.*`` and ``layers.{i}.2.*`` for the
  MLP); kvbench writes the same folder as ``kvzap-{kind}/``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kvbench.downloads import cache_dir
from kvbench.models import ModelError

GATE_REPO = "Jang-Hyun/Fast-KVzip"
KVZAP_REPO = "nvidia/KVzap-{kind}-{model}"


def shipped_dir() -> Path:
    """``methods/weights`` (installed as ``kvbench/methods/weights``)."""
    import kvbench.methods

    return Path(kvbench.methods.__file__).resolve().parent / "weights"


def model_name(config) -> str:
    """The name weights are filed under: the last part of the model's folder or hub id."""
    name = str(getattr(config, "name_or_path", "") or "").rstrip("/")
    return name.split("/")[-1] if name else ""


def local_dirs(name: str) -> list[Path]:
    """Shipped weights first, then what ``kvbench train`` wrote into the cache."""
    return [shipped_dir() / name.lower(), cache_dir() / "weights" / name.lower()]


def gate_file(config) -> str:
    group = config.num_attention_heads // config.num_key_value_heads
    return f"q{group}_dim16_sink16.pt"


def train_hint(method: str, config, kind: str | None = None) -> str:
    """The command that makes the missing weights, for the model as the user named it."""
    spec = str(getattr(config, "name_or_path", "") or "")
    if not spec or Path(spec).resolve().parent == (cache_dir() / "models").resolve():  # a converted alias
        spec = model_name(config) or "MODEL"
    extra = f" --kind {kind}" if kind else ""
    return f"make them with: kvbench train {method} --model {spec}{extra}"


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


def _check(name: str, what: str, got, want) -> None:
    if tuple(got) != tuple(want):
        raise ModelError(f"{what} do not fit model {name!r}: expected {tuple(want)}, found {tuple(got)}")


def gates_from_state(states: list[dict[str, torch.Tensor]], config, source: str) -> list[SinkGate]:
    """Build per-layer gates from state dicts in the published layout, checked against the model."""
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    name = model_name(config)
    _check(name, f"gates in {source} (layers)", (len(states),), (config.num_hidden_layers,))
    gates = []
    for state in states:
        width = state["q_norm.weight"].shape[-1]
        sinks = state["k_base"].shape[2]
        _check(name, f"gates in {source} (q_proj)", state["q_proj.weight"].shape,
               (kv_heads * group * width, config.hidden_size))
        gate = SinkGate(config.hidden_size, kv_heads, group, width, sinks)
        gate.load_state_dict({k: v.float() for k, v in state.items()})
        gates.append(gate.eval().requires_grad_(False))
    return gates


def read_gates(path: Path, config) -> list[SinkGate]:
    """A published ``.pt`` (read with ``weights_only=True``) or kvbench's ``gated.safetensors``."""
    if path.suffix == ".safetensors":
        flat = load_file(str(path))
        layers: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in flat.items():
            index, _, param = key.removeprefix("layers.").partition(".")
            layers.setdefault(int(index), {})[param] = tensor
        states = [layers[i] for i in sorted(layers)]
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing line
            raise ModelError(f"cannot read gates from {path}: {str(exc).splitlines()[0]}") from exc
        states = checkpoint["module"] if isinstance(checkpoint, dict) else checkpoint
    return gates_from_state(states, config, str(path))


def write_gates(gates: list[SinkGate], path: Path, dtype: torch.dtype = torch.float16) -> None:
    tensors = {f"layers.{i}.{k}": v.detach().to(dtype).contiguous() for i, g in enumerate(gates)
               for k, v in g.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


@functools.cache
def _hub_unreachable() -> str:
    """Why the hub cannot be asked ("" when it can): offline mode, or no connection within 3 s.

    huggingface_hub retries a failing request for about half a minute; one socket tells us sooner.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    outcome: list[str] = []

    def probe() -> None:  # name resolution ignores socket timeouts, so the whole probe runs aside
        try:
            socket.create_connection((host, 443), timeout=3).close()
            outcome.append("")
        except OSError as exc:
            outcome.append(f"{host} unreachable: {exc.strerror or type(exc).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=4)
    return outcome[0] if outcome else f"{host} unreachable: no answer in 4 s"


def _hub_file(repo: str, filename: str) -> tuple[Path | None, str]:
    """A file from the hub's local cache or the hub; (None, why) when it cannot be had."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None, "huggingface_hub is not installed"
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return Path(cached), ""
    why = _hub_unreachable()
    if why:
        return None, why
    try:
        return Path(hf_hub_download(repo, filename)), ""
    except Exception as exc:  # noqa: BLE001 - missing repo or file: both mean "not there"
        return None, f"{type(exc).__name__}"


def load_gates(config, path: str | os.PathLike | None = None) -> list[SinkGate]:
    """Gates for ``config``'s model from ``path`` or the usual places (see the module docstring)."""
    name = model_name(config)
    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            candidates = [path / "gated.safetensors", path / gate_file(config)]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise ModelError(f"no gates in {path} (looked for {', '.join(c.name for c in candidates)})")
            path = found[0]
        if not path.is_file():
            raise ModelError(f"gate weights {path} do not exist")
        return read_gates(path, config)
    looked = []
    for folder in local_dirs(name):
        candidate = folder / "gated.safetensors"
        looked.append(str(candidate))
        if candidate.is_file():
            return read_gates(candidate, config)
    hub_name = f"{name.lower()}/{gate_file(config)}"
    found, why = _hub_file(GATE_REPO, hub_name) if name else (None, "the model has no name")
    if found is not None:
        return read_gates(found, config)
    raise ModelError(
        f"no gated weights for model {name!r}: looked for {', '.join(looked)} and {GATE_REPO}/{hub_name} "
        f"on the Hugging Face hub ({why}); {train_hint('gated', config)}"
    )


class Surrogate(nn.Module):
    """KVzap's per-layer surrogates, the published ``KVzapModel`` layout: ``layers.{i}`` is a linear
    map or ``Linear → GELU → Linear`` from the attention input to H_kv predicted log KVzip+ scores."""

    def __init__(self, input_dim: int, output_dim: int, n_modules: int, hidden_dim: int | None = None):
        super().__init__()
        self.input_dim, self.output_dim, self.n_modules, self.hidden_dim = input_dim, output_dim, n_modules, hidden_dim
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
        module = self.layers[index]
        return module(x.to(next(module.parameters()).dtype)).float().transpose(1, 2)

    def config_dict(self) -> dict:
        return {"model_type": "kvzap", "input_dim": self.input_dim, "output_dim": self.output_dim,
                "hidden_dim": self.hidden_dim, "n_modules": self.n_modules}


def read_surrogate(folder: Path, config) -> Surrogate:
    name = model_name(config)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read KVzap surrogate from {folder}: {str(exc).splitlines()[0]}") from exc
    _check(name, f"KVzap surrogate in {folder} (input_dim, output_dim, n_modules)",
           (cfg["input_dim"], cfg["output_dim"], cfg["n_modules"]),
           (config.hidden_size, config.num_key_value_heads, config.num_hidden_layers))
    model = Surrogate(cfg["input_dim"], cfg["output_dim"], cfg["n_modules"], cfg.get("hidden_dim"))
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
            raise ModelError(f"no KVzap surrogate in {path} (looked for config.json and model.safetensors)")
        return read_surrogate(folder, config)
    looked = []
    for folder in local_dirs(name):
        looked.append(str(folder / f"kvzap-{kind}"))
        if (folder / f"kvzap-{kind}" / "config.json").is_file():
            return read_surrogate(folder / f"kvzap-{kind}", config)
    repo = KVZAP_REPO.format(kind=kind, model=name)
    why = "the model has no name"
    if name:
        cfg, why = _hub_file(repo, "config.json")
        if cfg is not None:
            weights, why = _hub_file(repo, "model.safetensors")
            if weights is not None:
                return read_surrogate(cfg.parent, config)
    raise ModelError(
        f"no KVzap {kind} weights for model {name!r}: looked for {', '.join(looked)} and {repo} on the "
        f"Hugging Face hub ({why}); {train_hint('kvzap', config, kind)}"
    )

