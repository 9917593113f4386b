"""``kvbench train gated|kvzap``: collect targets, fit, validate, write weights with their provenance.

Defaults are the papers' recipes (``--budget paper``); ``standard`` and ``quick`` are smaller
presets for machines that cannot run them, and every deviation from the paper's recipe is written
into the provenance file. Training refuses a kvbench checkout with uncommitted changes unless
``--allow-dirty`` (recorded), so shipped weights name the commit that made them.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from kvbench.core.engine import compressible_layers
from kvbench.core.weights import model_name
from kvbench.errors import UsageError
from kvbench.methods.gated import write_gates
from kvbench.methods.kvzap import write_surrogate
from kvbench.training.corpus import Corpus, read_corpus
from kvbench.training.fit import (Checkpoints, agreement, fit_gates, fit_linear, fit_mlp, gate_scores,
                                  sample_positions, surrogate_scores)
from kvbench.training.targets import cached_features, chat_flags, token_windows

VALIDATION_RATIOS = (0.5, 0.7)
BUDGETS = ("paper", "standard", "quick")


@dataclass(frozen=True)
class Recipe:
    """How much is trained on and for how long. ``texts=None``: as many as ``tokens`` takes."""

    texts: int | None
    validation: int
    lengths: tuple[int, int]  # tokens per text, inclusive range
    steps: int = 0  # gated: SGD steps
    batch: int = 0  # gated: tokens per step; kvzap mlp: samples per step
    positions: int = 0  # kvzap: sampled token positions per text
    epochs: int = 0  # kvzap mlp
    hidden_dim: int = 0  # kvzap mlp
    tokens: int | None = None  # gated paper: training tokens to reach


def preset(what: str, budget: str, max_context: int) -> Recipe:
    """The recipe of a ``--budget``: ``paper`` is the authors' own, scaled to the model's context.

    - gated, paper (Fast KVzip, Janghyun1230/FastKVzip): 5,000 SGD steps of 1,000 tokens on about a
      million tokens of fineweb-edu in contexts of 10K-100K tokens, on models holding 128K; scaled
      here to 10%-78% of the model's context (819-6,400 tokens on SmolLM2's 8,192).
    - kvzap, paper (KVzap, NVIDIA/kvpress ``kvzap``): ~4,500 texts of 750-1,250 tokens, 500 token
      positions each (~2.2M samples), MLP width 512, 15 epochs of batches of 512 (~65K steps). Texts
      of that length fit every model, so nothing is scaled.
    - standard: what one 2-core CPU trains in about an hour (both methods), on 40 texts of 1,000 tokens that
      both methods share (their targets are collected once); quick: a smoke test.
    """
    if what == "gated":
        if budget == "paper":
            low, high = max(64, max_context // 10), max(64, max_context * 100 // 128)
            return Recipe(None, 4, (min(low, high), high), steps=5000, batch=1000, tokens=1_000_000)
        if budget == "standard":
            return Recipe(40, 4, (1000, 1000), steps=1000, batch=1000)
        return Recipe(8, 2, (256, 256), steps=100, batch=500)
    if budget == "paper":
        return Recipe(4500, 4, (750, 1250), positions=500, epochs=15, hidden_dim=512, batch=512)
    if budget == "standard":
        return Recipe(40, 4, (1000, 1000), positions=500, epochs=15, hidden_dim=512, batch=512)
    return Recipe(8, 2, (256, 256), positions=100, epochs=2, hidden_dim=512, batch=256)


@dataclass
class TrainConfig:
    what: str  # "gated" or "kvzap"
    model: str
    kind: str = "mlp"  # kvzap only
    budget: str = "paper"
    corpus: str | None = None  # None: the offline Python corpus
    text_field: str = "text"
    chat_fraction: float = 0.5  # share of texts prefilled inside the chat template
    overrides: dict = field(default_factory=dict)  # Recipe fields set on the command line
    lr: float | None = None
    seed: int = 0
    out: Path | None = None
    device: str | None = None
    dtype: str | None = None
    allow_dirty: bool = False
    reason: str = ""  # why the recipe deviates from the paper's, in the provenance
    checkpoint_every: int = 100
    validate_every: int = 100
    command: str = ""
    stop_after: int | None = None  # tests: stop the fit as if killed after this many steps
    extra: dict = field(default_factory=dict)


def check_config(config: TrainConfig) -> None:
    """Bad arguments are a ``UsageError`` before anything loads."""
    if config.what not in ("gated", "kvzap") or config.kind not in ("linear", "mlp"):
        raise UsageError(f"train {config.what!r} --kind {config.kind!r}: expected gated, or kvzap with linear/mlp")
    if config.budget not in BUDGETS:
        raise UsageError(f"--budget {config.budget!r}: expected one of {', '.join(BUDGETS)}")
    for name, value in config.overrides.items():
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if not 0 <= config.chat_fraction <= 1:
        raise UsageError(f"--chat-fraction {config.chat_fraction}: expected a share between 0 and 1")
    if config.lr is not None and not config.lr > 0:
        raise UsageError(f"--lr {config.lr}: expected a positive learning rate")
    if config.checkpoint_every < 1 or config.validate_every < 1:
        raise UsageError("--checkpoint-every and --validate-every must be at least 1")


def git_state() -> tuple[str | None, bool | None]:
    """(commit, uncommitted changes?) of the kvbench checkout; (None, None) for an installed wheel."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if sha.returncode != 0 or status.returncode != 0:
        return None, None
    return sha.stdout.strip(), bool(status.stdout.strip())


def _versions() -> dict:
    import transformers

    import kvbench

    return {"kvbench": kvbench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def resolve(config: TrainConfig, max_context: int) -> tuple[Recipe, Recipe]:
    """(the recipe this run uses, the paper's for the same model)."""
    paper = preset(config.what, "paper", max_context)
    recipe = preset(config.what, config.budget, max_context)
    overrides = {k: v for k, v in config.overrides.items() if v is not None}
    if "length" in overrides:
        length = overrides.pop("length")
        overrides["lengths"] = (length, length)
    if "texts" in overrides:
        overrides["tokens"] = None
    return replace(recipe, **overrides), paper


def deviations(recipe: Recipe, paper: Recipe, what: str, kind: str, used_texts: int) -> list[str]:
    """Each way this run differs from the paper's recipe, in words."""
    keys = ["steps", "batch"] if what == "gated" else ["positions"] + (
        ["epochs", "hidden_dim", "batch"] if kind == "mlp" else [])
    out = [f"{k}: {getattr(recipe, k)} (paper {getattr(paper, k)})" for k in keys
           if getattr(recipe, k) != getattr(paper, k)]
    if recipe.lengths != paper.lengths:
        out.append(f"tokens per text: {recipe.lengths[0]}-{recipe.lengths[1]} (paper, scaled: "
                   f"{paper.lengths[0]}-{paper.lengths[1]})")
    wanted = paper.texts if paper.texts is not None else math.ceil(paper.tokens / (sum(paper.lengths) / 2))
    if used_texts != wanted:
        out.append(f"training texts: {used_texts} (paper {wanted})")
    if what == "kvzap" and kind == "mlp":  # the step count follows from samples, batch and epochs
        used = max(used_texts * recipe.positions // recipe.batch, 1) * recipe.epochs
        ours = max(wanted * paper.positions // paper.batch, 1) * paper.epochs
        if used != ours:
            out.append(f"optimisation steps: {used:,} (paper {ours:,})")
    return out


def train(config: TrainConfig, log=print) -> Path:
    """Collect targets, fit, validate and write weights plus their provenance JSON; returns the weights."""
    from kvbench.downloads import cache_dir
    from kvbench.models import load_model

    started = time.perf_counter()
    check_config(config)
    corpus: Corpus = read_corpus(config.corpus, config.text_field)
    sha, dirty = git_state()
    if dirty and not config.allow_dirty:
        raise UsageError(f"the kvbench checkout at commit {sha[:12]} has uncommitted changes: commit them so the "
                         "weights name the code that made them, or pass --allow-dirty (recorded)")
    loaded = load_model(config.model, config.device, config.dtype, log=log)
    name = model_name(loaded.model.config)
    out = Path(config.out) if config.out else cache_dir() / "weights" / name.lower()
    max_context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 8192)
    recipe, paper = resolve(config, max_context)
    if recipe.lengths[1] > max_context:
        raise UsageError(f"texts of {recipe.lengths[1]} tokens do not fit {name}, which holds {max_context}")

    windows = token_windows(loaded.tokenizer, corpus.documents, recipe.lengths, config.seed)
    wanted = recipe.texts if recipe.texts is not None else math.ceil(recipe.tokens / (sum(recipe.lengths) / 2))
    if recipe.texts is None and len(windows) < wanted + recipe.validation:
        wanted = len(windows) - recipe.validation
        log(f"kvbench: the corpus holds {len(windows)} texts of {recipe.lengths[0]}-{recipe.lengths[1]} tokens: "
            f"training on {wanted}, fewer than the recipe's tokens (recorded)")
    if wanted < 1 or len(windows) < wanted + recipe.validation:
        raise UsageError(f"the training corpus holds {len(windows)} texts of {recipe.lengths[0]}-"
                         f"{recipe.lengths[1]} tokens, not the {wanted} + {recipe.validation} asked for "
                         "(fewer --texts, a shorter --length or a larger --corpus)")
    texts = windows[:wanted + recipe.validation]
    chat_fraction = config.chat_fraction
    if chat_fraction and not loaded.tokenizer.chat_template:
        log(f"kvbench: {name} has no chat template (a base model): every text is prefilled plain (recorded)")
        chat_fraction = 0.0
    chat = chat_flags(len(texts), chat_fraction, config.seed)
    layers = compressible_layers(loaded.model)  # sliding-window layers are never scored: no targets, no weights
    t0 = time.perf_counter()
    features = cached_features(loaded, texts, chat, log)
    collect_s = time.perf_counter() - t0
    held_out, train_set = features[:recipe.validation], features[recipe.validation:]
    stem = "gated" if config.what == "gated" else f"kvzap-{config.kind}"
    fingerprint = {"stem": stem, "model": name, "dtype": str(loaded.dtype), "device": str(loaded.device),
                   "corpus": corpus.sha256, "recipe": asdict(recipe), "lr": config.lr, "seed": config.seed,
                   "chat_fraction": chat_fraction, "validate_every": config.validate_every}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    checkpoints = Checkpoints(cache_dir() / "checkpoints" / f"{name.lower()}-{stem}-{digest}.pt",
                              config.checkpoint_every, config.stop_after, fingerprint)
    t0 = time.perf_counter()
    losses: dict = {}
    if config.what == "gated":
        lr = config.lr or 0.2
        gates, record = fit_gates(train_set, loaded.model.config, recipe.steps, recipe.batch, lr, config.seed,
                                  held_out=held_out, validate_every=config.validate_every,
                                  checkpoints=checkpoints, log=log)
        predicted = [gate_scores(gates, f.hidden) for f in held_out]
        weights = out / "gated.safetensors"
        write_gates(gates, weights, layers=layers)
        fit_recipe = {"loss": "binary cross-entropy vs soft KVzip scores", "optimizer": "SGD momentum 0.9",
                      "lr": lr, "schedule": "1% warm-up, x0.5 at 50%, x0.25 at 75%", "steps": recipe.steps,
                      "tokens_per_step": recipe.batch, "width": 16, "sink_keys": 16}
        teachers = {"kvzip": [f.kvzip for f in held_out]}
        tail = record.losses[-50:]
        losses = {"train_first": record.losses[0], "train_final_mean_last_50": sum(tail) / len(tail),
                  "validation_bce_final": record.validation[-1][1] if record.validation else None}
    else:
        x, y = sample_positions(train_set, recipe.positions, config.seed)
        if config.kind == "linear":
            surrogate, record = fit_linear(x, y, layer_indices=layers), None
            fit_recipe = {"fit": "ridge regression per layer, alpha 1, exact solve"}
        else:
            lr = config.lr or 5e-3
            x_val = torch.cat([f.hidden.float() for f in held_out], dim=1)
            y_val = torch.cat([f.plus.transpose(1, 2) for f in held_out], dim=1)
            surrogate, record = fit_mlp(x, y, recipe.hidden_dim, recipe.epochs, lr, recipe.batch, config.seed,
                                        held_out=(x_val, y_val), validate_every=config.validate_every,
                                        checkpoints=checkpoints, log=log, layer_indices=layers)
            fit_recipe = {"fit": f"MLP d-{recipe.hidden_dim}-GELU-H per layer, MSE", "optimizer": "AdamW",
                          "lr": lr, "schedule": "cosine", "epochs": recipe.epochs, "batch": recipe.batch,
                          "steps": len(record.losses), "grad_clip": 1.0}
        fit_recipe.update(positions_per_text=recipe.positions, samples=x.shape[1])
        predicted = [surrogate_scores(surrogate, f.hidden) for f in held_out]
        with torch.no_grad():
            val_mse = sum(float(F.mse_loss(p, f.plus)) for p, f in zip(predicted, held_out)) / len(held_out)
            train_mse = float(F.mse_loss(surrogate_scores(surrogate, x), y.transpose(1, 2)))
        weights = out / f"kvzap-{config.kind}"
        write_surrogate(surrogate, weights)
        teachers = {"kvzip": [f.kvzip for f in held_out], "kvzip_plus": [f.plus for f in held_out]}
        losses = {"train_mse_final": train_mse, "validation_mse_final": val_mse}
        if record is not None:
            losses["train_first"] = record.losses[0]
    fit_s = time.perf_counter() - t0
    checkpoints.remove()
    validation = {
        f"agreement_with_{teacher}": {str(r): round(agreement(predicted, target, r), 4) for r in VALIDATION_RATIOS}
        for teacher, target in teachers.items()
    }
    changed = deviations(recipe, paper, config.what, config.kind, len(train_set))
    provenance = {
        "method": config.what,
        "kind": config.kind if config.what == "kvzap" else None,
        "model": config.model,
        "model_name": name,
        "command": config.command,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha,
        "git_dirty": dirty,
        "allow_dirty": config.allow_dirty,
        "versions": _versions(),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "corpus": corpus.describe(),
        "data": {"train_texts": len(train_set), "validation_texts": len(held_out),
                 "tokens_per_text": list(recipe.lengths), "chat_formatted_share": chat_fraction,
                 "seed": config.seed, "train_tokens": sum(f.hidden.shape[1] for f in train_set),
                 "layers": layers if len(layers) < loaded.model.config.num_hidden_layers else "all"},
        "targets": "KVzip (chunks of 2,000, repeat prompt in the chat template)"
                   + ("" if config.what == "gated" else "; log KVzip+ (x ||W_o v|| / ||x||)"),
        "budget": config.budget,
        "recipe": fit_recipe,
        "paper_recipe": asdict(paper),
        "deviations_from_paper": changed,
        "reason": config.reason or ("" if not changed else f"budget {config.budget!r}"),
        "loss": losses,
        "validation_loss_curve": [[s, round(v, 5)] for s, v in record.validation] if record else [],
        "resumed_from_step": record.resumed_from if record else 0,
        "validation": {"allocation": "global", "measure": "|kept ∩ teacher kept| / |teacher kept|", **validation},
        "seconds": {"collect_or_load_targets": round(collect_s, 1), "fit_this_process": round(fit_s, 1),
                    "fit_all_pieces": round(record.seconds, 1) if record else round(fit_s, 1),
                    "total_this_process": round(time.perf_counter() - started, 1)},
        **config.extra,
    }
    (out / f"{stem}.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    summary = ", ".join(f"{teacher.removeprefix('agreement_with_')}@{r} {v:.3f}"
                        for teacher, figures in validation.items() for r, v in figures.items())
    log(f"kvbench: wrote {weights} and {out / (stem + '.json')}")
    log(f"kvbench: validation agreement with the teacher's kept set ({len(held_out)} held-out texts): {summary}")
    return weights
