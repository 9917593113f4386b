"""One process: load the model once, then for every sample prefill once, compress, answer, record.

For each context the runner prefills the full cache once, answers every question with it (the
``full`` baseline, whose tokens also define ``token_match``), then lets every method score that same
cache once and cuts every requested ratio from those scores — no second prefill. With
``query_aware`` the question is part of what is prefilled and compressed, so there is one prefill
per question instead.
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import transformers

import kvbench
from kvbench import attention, engine
from kvbench.cache import EvictableCache
from kvbench.methods import Method, get_method, list_methods
from kvbench.models import LoadedModel, load_model
from kvbench.prompts import split_prompt
from kvbench.results import ResultsWriter, git_sha, summarize
from kvbench.scoring import HiddenRecorder
from kvbench.tasks import Question, Sample, get_task, list_tasks
from kvbench.tasks.metrics import score as metric_score


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


@dataclass
class RunConfig:
    methods: list[str]
    ratios: list[float]
    model: str = "smollm2-135m"
    task: str = "ruler"
    length: int = 1024
    samples: int = 2
    query_aware: bool = False
    device: str | None = None
    dtype: str | None = None
    prefill_chunk: int = 512
    out: Path = Path("results")
    seed: int = 0
    baseline: bool = True  # also answer with the full cache (feeds token_match)
    trust_remote_code: bool = False
    method_options: dict[str, dict] = field(default_factory=dict)
    command: str = ""


def parse_task(spec: str) -> tuple[str, list[str] | None]:
    """``"ruler"`` → all subtasks; ``"ruler:niah_single_1,vt"`` → those."""
    name, _, subtasks = spec.partition(":")
    return name, [s for s in subtasks.split(",") if s] or None


def validate(config: RunConfig) -> tuple[list[Method], object, list[str]]:
    """Check everything that can be checked before loading the model; return methods, task, subtasks."""
    known = list_methods()
    for name in config.methods:
        if name not in known:
            raise UsageError(f"unknown method {name!r} (known: {', '.join(known)})")
    for ratio in config.ratios:
        if not 0.0 <= ratio < 1.0:
            raise UsageError(f"ratio {ratio} is outside [0, 1): it is the fraction of the context evicted")
    if "full" in config.methods and any(r > 0 for r in config.ratios) and config.methods == ["full"]:
        raise UsageError("method 'full' evicts nothing: use --ratio 0 (or pick an eviction method)")
    if config.samples < 1:
        raise UsageError("--samples must be at least 1")
    if config.prefill_chunk < 1:
        raise UsageError("--prefill-chunk must be at least 1")
    if config.length < 64:
        raise UsageError(f"--length {config.length} is too short (at least 64 tokens)")
    try:
        methods = [get_method(n, seed=config.seed, **config.method_options.get(n, {})) for n in config.methods]
    except (KeyError, ValueError, TypeError) as err:
        raise UsageError(str(err).strip("'\"")) from None

    name, subtasks = parse_task(config.task)
    if name not in list_tasks():
        raise UsageError(f"unknown task {name!r} (known: {', '.join(list_tasks())})")
    task = get_task(name)
    unavailable = task.unavailable()
    if subtasks is None:
        subtasks = [s for s in task.subtasks() if s not in unavailable]
        for skipped, reason in unavailable.items():
            print(f"kvbench: skipping {name}:{skipped}: {reason}", file=sys.stderr)
    for sub in subtasks:
        if sub not in task.subtasks():
            raise UsageError(f"unknown subtask {name}:{sub} (known: {', '.join(task.subtasks())})")
        if sub in unavailable:
            raise UsageError(f"{name}:{sub} is unavailable here: {unavailable[sub]}")
    if not subtasks:
        raise UsageError(f"no subtask of {name} is available here")
    return methods, task, subtasks


def token_match(candidate: list[int], reference: list[int]) -> tuple[float, int | None]:
    """Fraction of positions where the two greedy answers agree, and where they first differ.

    Positions up to the longer answer count, so a length mismatch counts as misses; two empty
    answers match fully. The divergence is None when the answers are identical.
    """
    longest = max(len(candidate), len(reference))
    if longest == 0:
        return 1.0, None
    same = sum(a == b for a, b in zip(candidate, reference))
    diverge = next((i for i, (a, b) in enumerate(zip(candidate, reference)) if a != b), None)
    if diverge is None and len(candidate) != len(reference):
        diverge = min(len(candidate), len(reference))
    return same / longest, diverge


class Runner:
    """Holds the loaded model and writes rows for each sample it is given."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, methods: list[Method]):
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.methods = [m for m in methods if m.evicts]
        self.run_baseline = config.baseline or any(not m.evicts for m in methods)
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        self.writer = ResultsWriter(config.out, self.run_id)
        self.eos_ids = self._eos_ids()
        self.meta = {
            "run_id": self.run_id,
            "command": config.command,
            "git_sha": git_sha(),
            "kvbench_version": kvbench.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "device": self._device_name(),
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "model": loaded.name,
            "query_aware": config.query_aware,
            "prefill_chunk": config.prefill_chunk,
            "requested_length": config.length,
            "seed": config.seed,
        }
        attention.install(self.model)

    def _eos_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak(self, cache: EvictableCache) -> tuple[int, str]:
        """CUDA: every allocation (weights included); CPU: the KV cache's own high-water mark."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        return cache.peak_bytes, "kv_cache"

    def _hidden_window(self) -> int | None:
        windows = [m.hidden_window() for m in self.methods]
        return None if None in windows else max(windows, default=0)

    def run_sample(self, sample: Sample, task_name: str) -> list[dict]:
        parts = split_prompt(self.tokenizer, sample.context, sample.chat_template)
        question_ids = {
            q.question_id: parts.question_ids(self.tokenizer, q.text, q.answer_prefix) for q in sample.questions
        }
        if self.config.query_aware:  # question inside what is compressed: one prefill per question
            units = [(parts.context_ids + question_ids[q.question_id], [q]) for q in sample.questions]
        else:
            units = [(parts.context_ids, sample.questions)]
        rows = []
        for ids, questions in units:
            rows += self._run_unit(sample, task_name, ids, questions, question_ids)
        return rows

    def _run_unit(self, sample, task_name, ids, questions, question_ids) -> list[dict]:
        model, device = self.model, self.device
        context = torch.tensor([ids], device=device)
        total = context.shape[1]
        cache = engine.new_cache(model)
        self._reset_peak()
        window = self._hidden_window()
        recorder = HiddenRecorder(engine.attention_modules(model), window) if window != 0 else None
        with engine.Timer(device) as prefill_timer:
            last_logits = engine.prefill(model, cache, context, 0, self.config.prefill_chunk)
        if recorder:
            recorder.remove()
        full_bytes = cache.nbytes
        common = {
            **self.meta,
            "task": task_name,
            "subtask": sample.subtask,
            "context_tokens": total,
            "sample_id": sample.sample_id,
            "metric": sample.metric,
            "prefill_s": prefill_timer.seconds,
            "kv_bytes_full": full_bytes,
        }

        def answer(cell_cache: EvictableCache, question: Question) -> tuple[list[int], float]:
            lengths = cell_cache.lengths()
            with engine.Timer(device) as timer:
                if self.config.query_aware:
                    first, start = last_logits, total
                else:
                    q_ids = torch.tensor([question_ids[question.question_id]], device=device)
                    first, start = engine.forward(model, cell_cache, q_ids, total), total + q_ids.shape[1]
                tokens = engine.greedy(model, cell_cache, first, start, sample.max_new_tokens, self.eos_ids)
            cell_cache.rollback(lengths)
            return tokens, timer.seconds

        def rows_for(cell_cache, method: Method, ratio: float, measured: float, scoring_s: float, reference_tokens):
            kept_bytes, physical = cell_cache.nbytes, cell_cache.nbytes
            out = []
            for question in questions:
                tokens, decode_s = answer(cell_cache, question)
                prediction = self.tokenizer.decode(tokens, skip_special_tokens=True)
                peak, peak_kind = self._peak(cell_cache)
                match, diverge = (
                    token_match(tokens, reference_tokens[question.question_id])
                    if reference_tokens is not None else (None, None)
                )
                out.append({
                    **common,
                    "question_id": question.question_id,
                    "method": method.name,
                    "method_config": json.dumps(method.config(), sort_keys=True),
                    "allocation": "uniform",
                    "target_ratio": ratio,
                    "measured_ratio": measured,
                    "kv_bytes_kept": kept_bytes,
                    "kv_bytes_physical": physical,
                    "peak_mem_bytes": peak,
                    "peak_mem_kind": peak_kind,
                    "scoring_s": scoring_s,
                    "decode_s": decode_s,
                    "new_tokens": len(tokens),
                    "prediction": prediction,
                    "reference": json.dumps(question.references),
                    "score": metric_score(sample.metric, prediction, question.references),
                    "token_match": match,
                    "first_divergence": diverge,
                    "_tokens": tokens,
                })
            return out

        rows = []
        full_tokens = None
        if self.run_baseline:
            full_rows = rows_for(cache, get_method("full", seed=self.config.seed), 0.0, 0.0, 0.0, None)
            full_tokens = {r["question_id"]: r.pop("_tokens") for r in full_rows}
            for r in full_rows:
                r["token_match"], r["first_divergence"] = 1.0, None
            rows += full_rows

        for m_index, method in enumerate(self.methods):
            with engine.Timer(device) as scoring_timer:  # once per method: every ratio is cut from it
                layer_scores = engine.score_layers(model, cache, method, recorder, context)
            for r_index, ratio in enumerate(self.config.ratios):
                last = m_index == len(self.methods) - 1 and r_index == len(self.config.ratios) - 1
                cell_cache = cache if last else cache.clone()  # the last cell may consume the prefill
                self._reset_peak()
                with engine.Timer(device) as evict_timer:
                    eviction = engine.evict(cell_cache, layer_scores, ratio)
                cell_rows = rows_for(cell_cache, method, ratio, eviction.measured_ratio,
                                     scoring_timer.seconds + evict_timer.seconds, full_tokens)
                for r in cell_rows:
                    r.pop("_tokens")
                rows += cell_rows
        return rows


def run(config: RunConfig, log=print) -> Path:
    """Validate, load the model once, run every sample, write parquet; returns the part file."""
    methods, task, subtasks = validate(config)
    loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code, log=log)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions and config.length > max_positions:
        raise UsageError(f"--length {config.length} exceeds what {config.model} can hold ({max_positions} positions)")
    runner = Runner(config, loaded, methods)
    samples = []
    for sub in subtasks:
        try:
            samples += list(task.samples([sub], config.samples, loaded.tokenizer, config.length, config.seed))
        except ValueError as err:
            raise UsageError(str(err)) from None
    log(f"kvbench: {len(samples)} samples × methods {','.join(config.methods)} × ratios "
        f"{','.join(map(str, config.ratios))} on {runner.meta['device']} ({runner.meta['dtype']})")
    for i, sample in enumerate(samples, 1):
        rows = runner.run_sample(sample, task.name)
        runner.writer.add(rows)
        scores = " | ".join(f"{r['method']}@{r['target_ratio']:g} {r['score']:.0f}" for r in rows)
        log(f"[{i}/{len(samples)}] {task.name}:{sample.subtask} {rows[0]['context_tokens']} tokens, "
            f"prefill {rows[0]['prefill_s']:.1f}s: {scores}")
    frame = summarize(pd.DataFrame(runner.writer.rows))
    log("\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    log(f"\nkvbench: wrote {len(runner.writer.rows)} rows to {runner.writer.path}")
    return runner.writer.path
