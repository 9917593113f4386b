"""Training data for the learned scorers: texts, their attention inputs and KVzip targets.

Collection is forward-only: each training text is prefilled (a share of them inside the model's
chat template) with every layer's attention inputs recorded, and KVzip's reconstruction pass
(``kvbench.core.reconstruction``) gives two targets per entry in one go: the KVzip score (the
gates' target) and the log KVzip+ score (the surrogates').
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvbench.core import attention
from kvbench.core.engine import compressible_layers
from kvbench.core.prompts import split_prompt
from kvbench.core.reconstruction import reconstruction_scores
from kvbench.core.session import Session


def token_windows(tokenizer, documents: list[str] | tuple[str, ...], lengths: tuple[int, int],
                  seed: int) -> list[str]:
    """Every text the documents joined end to end make, each of a seeded random length in ``lengths``
    (inclusive), non-overlapping (no token is in two texts), in a seeded shuffled order."""
    ids: list[int] = []
    for doc in documents:
        ids += tokenizer.encode(re.sub(r"[ \t]+", " ", doc.strip()) + "\n\n", add_special_tokens=False)
    rng = random.Random(seed)
    low, high = lengths
    windows, start = [], 0
    while True:
        length = rng.randint(low, high)
        if start + length > len(ids):
            break
        windows.append(ids[start:start + length])
        start += length
    rng.shuffle(windows)
    return [tokenizer.decode(w) for w in windows]


def chat_flags(count: int, fraction: float, seed: int) -> list[bool]:
    """Which texts are prefilled inside the chat template (seeded, ``round(fraction * count)`` of them)."""
    chosen = set(random.Random(f"chat/{seed}").sample(range(count), round(fraction * count)))
    return [i in chosen for i in range(count)]


@dataclass
class TextFeatures:
    """One text's attention inputs and KVzip targets over every prompt token (a chat template's too),
    for the layers eviction cuts (``engine.compressible_layers``: all but sliding-window layers, whose
    entries are never scored and hold only their window)."""

    hidden: torch.Tensor  # (L, n, d), model dtype, L compressible layers
    kvzip: torch.Tensor  # (L, H, n), float32 probabilities
    plus: torch.Tensor  # (L, H, n), float32 log KVzip+


@torch.inference_mode()
def collect_one(model, tokenizer, session: Session, text: str, chat: bool) -> TextFeatures:
    """Prefill one text (inside the chat template when ``chat``) recording the attention inputs, and
    score every entry with KVzip and KVzip+. A chat text keeps its template's tokens, so the scorers
    learn the template region that every chat-formatted evaluation prompt starts with."""
    ids = split_prompt(tokenizer, text, chat_template=chat).context_ids
    prefill = session.prefill(torch.tensor([ids], device=session.device), record_inputs=True)
    kvzip, plus = reconstruction_scores(model, prefill.cache, prefill.ids, tokenizer, plus=True)
    layers = compressible_layers(model)
    return TextFeatures(
        hidden=torch.stack([prefill.recorder.hidden[i][0] for i in layers]).cpu(),
        kvzip=torch.stack([kvzip[i][0] for i in layers]).float().cpu(),
        plus=torch.stack([plus[i][0] for i in layers]).float().cpu(),
    )


def collect(model, tokenizer, texts: list[str], chat: list[bool] | None = None, desc: str = "KVzip targets",
            store: Path | None = None, key: str = "") -> list[TextFeatures]:
    """Features of every text. With ``store``, each text's features are written there as soon as they
    are made and read back on the next call: a killed collection resumes where it stopped, and
    ``train gated`` and ``train kvzap`` on the same texts share them."""
    attention.install(model)
    session = Session(model, prefill_chunk=4096)
    chat = [True] * len(texts) if chat is None else chat
    features = []
    for text, in_chat in tqdm(list(zip(texts, chat)), desc=desc, unit="text", file=sys.stderr):
        path = None
        if store is not None:
            name = hashlib.sha256(json.dumps([key, text, in_chat]).encode()).hexdigest()[:24]
            path = store / f"{name}.pt"
            if path.is_file():
                features.append(TextFeatures(**torch.load(path, weights_only=True)))
                continue
        item = collect_one(model, tokenizer, session, text, in_chat)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(vars(item), tmp)
            tmp.replace(path)
        features.append(item)
    return features


def cached_features(loaded, texts: list[str], chat: list[bool], log) -> list[TextFeatures]:
    """Features from the kvbench cache (per text, keyed by model, dtype, device, text, template)."""
    from kvbench.downloads import cache_dir

    store = cache_dir() / "features"
    key = json.dumps([loaded.name, str(loaded.dtype), str(loaded.device)])
    log(f"kvbench: KVzip targets of {len(texts)} texts ({sum(chat)} chat-formatted), cached per text in {store}")
    return collect(loaded.model, loaded.tokenizer, texts, chat, store=store, key=key)
