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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

import kvbench
from kvbench import attention, engine
from kvbench.budget import ALLOCATIONS
from kvbench.cache import EvictableCache
from kvbench.methods import Method, get_method, list_methods
from kvbench.models import LoadedModel, load_model
from kvbench.prompts import split_prompt
from kvbench.results import ResultsWriter, git_sha, summarize
from kvbench.scoring import HiddenRecorder
from kvbench.sweep import row_key, written_keys
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
    allocation: str | None = None  # None: each method's own default
    evict_during_prefill: bool = False
    evict_during_decoding: bool = False
    decode_interval: int | None = 128
    shard: tuple[int, int] = (0, 1)  # (index, count): this process takes samples index, index+count, ...
    resume: bool = False  # skip samples whose rows are already in `out` (kvbench sweep)
    trust_remote_code: bool = False
    method_options: dict[str, dict] = field(default_factory=dict)
    command: str = ""
    data_dir: Path | None = None  # --data-dir: local copies of a task's data files
    max_context: int | None = None  # --max-context: prompt tokens kept by tasks that truncate (LongBench)


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
    if config.allocation is not None and config.allocation not in ALLOCATIONS:
        raise UsageError(f"unknown allocation {config.allocation!r} (choose {', '.join(ALLOCATIONS)})")
    if config.decode_interval is not None and config.decode_interval <= 0:
        raise UsageError(f"--decode-interval must be a positive number of tokens, not {config.decode_interval}")
    try:
        methods = [get_method(n, seed=config.seed, **_options(config, n)) for n in config.methods]
    except (KeyError, ValueError, TypeError) as err:
        raise UsageError(str(err).strip("'\"")) from None
    if any(threshold_mode(m) for m in methods) and config.evict_during_prefill:
        raise UsageError("threshold mode evicts after prefill; drop --evict-during-prefill or the threshold")
    for method in methods:
        for flag, wanted in [("prefill", config.evict_during_prefill), ("decoding", config.evict_during_decoding)]:
            if wanted and method.evicts and not method.incremental and not method.manages_cache:
                able = ", ".join(n for n in list_methods() if get_method(n).incremental)
                raise UsageError(f"{method.name} cannot evict during {flag}: it scores the whole context at once "
                                 f"(methods that can: {able})")

    name, subtasks = parse_task(config.task)
    if name not in list_tasks():
        raise UsageError(f"unknown task {name!r} (known: {', '.join(list_tasks())})")
    task = get_task(name)
    task.data_dir, task.max_context = config.data_dir, config.max_context  # before unavailable(): it may read them
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


def threshold_mode(method: Method) -> bool:
    """Threshold methods (KVzap with a threshold) decide their own kept set: only a measured ratio."""
    return getattr(method, "threshold", None) is not None


def cell_ratios(method: Method, ratios: list[float]) -> list[float]:
    return [float("nan")] if threshold_mode(method) else ratios


def _options(config: RunConfig, name: str) -> dict:
    options = dict(config.method_options.get(name, {}))
    if config.allocation is not None and name != "full":
        options["allocation"] = config.allocation
    return options


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
        self.eos_ids = engine.eos_ids(self.model, self.tokenizer)
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

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return "cpu"

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, cpu_bytes: int) -> tuple[int, str]:
        """CUDA: every allocation since the unit's prefill began (weights included). CPU: the KV
        cache's high-water mark (padding, masks and method state included) plus the attention
        inputs recorded for scoring, passed in as ``cpu_bytes``."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        return cpu_bytes, "kv_cache+scoring_inputs"

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

    def _run_unit(self, sample: Sample, task_name: str, ids: list[int], questions: list[Question],
                  question_ids: dict[str, list[int]]) -> list[dict]:
        """Rows for one prefilled unit: the context (or, query-aware, context + one question)."""
        context = torch.tensor([ids], device=self.device)
        unit = Unit(self, sample, task_name, context, questions, question_ids)
        rows: list[dict] = []
        reference = None
        # methods with their own prefill: those that manage their cache, and all of them when evicting during prefill
        own_prefill = self.config.evict_during_prefill
        own = [m for m in self.methods if m.manages_cache or own_prefill]
        one_shot = [m for m in self.methods if not (m.manages_cache or own_prefill)]
        if self.run_baseline or one_shot:
            try:
                prefilled = unit.prefill(one_shot)
            except Exception as err:  # noqa: BLE001  (out of memory included: record it, go on)
                full = [get_method("full", seed=self.config.seed)] if self.run_baseline else []
                return [r for m in full + one_shot for ratio in ([0.0] if not m.evicts else cell_ratios(m, self.config.ratios))
                        for r in unit.error_rows(m, ratio, err)]
            prefill_peak = prefilled.cache.peak_bytes
            if self.run_baseline:
                full = get_method("full", seed=self.config.seed)
                baseline = unit.cell(full, 0.0, lambda: unit.answer_all(
                    replace(prefilled, recorded_bytes=0), full, 0.0, engine.Eviction(1, 1), 0.0, None))
                reference = {r["question_id"]: r["_tokens"] for r in baseline if "_tokens" in r}
                rows += baseline
            for m_index, method in enumerate(one_shot):
                # a row's CPU peak is its own method's: the prefill's high-water mark, raised only by this
                # method's scoring (KVzip's extra forwards), plus the attention inputs this method reads
                prefilled.cache.peak_bytes = prefill_peak
                recorded = prefilled.recorder.nbytes_of_last(method.hidden_window()) if prefilled.recorder else 0
                scored = replace(prefilled, recorded_bytes=recorded)
                ratios = cell_ratios(method, self.config.ratios)
                with engine.Timer(self.device) as scoring_timer:  # once per method: every ratio is cut from it
                    try:
                        scores = engine.score_layers(self.model, prefilled.cache, method, prefilled.recorder, context,
                                                     ratio=ratios[0])
                    except Exception as err:  # noqa: BLE001
                        rows += [r for ratio in ratios for r in unit.error_rows(method, ratio, err)]
                        continue
                for r_index, ratio in enumerate(ratios):
                    last = m_index == len(one_shot) - 1 and r_index == len(ratios) - 1
                    rows += unit.cell(method, ratio, lambda: self._one_shot_cell(
                        unit, scored, scores, method, ratio, scoring_timer.seconds, reference, consume=last,
                        rescore=method.ratio_dependent() and r_index > 0))
        for method in own:
            for ratio in self.config.ratios:
                rows += unit.cell(method, ratio, lambda: self._own_prefill_cell(unit, method, ratio, reference))
        for row in rows:
            row.pop("_tokens", None)
        return rows

    def _one_shot_cell(self, unit: "Unit", prefilled: "Prefilled", scores: list[torch.Tensor], method: Method,
                       ratio: float, scoring_s: float, reference, consume: bool, rescore: bool = False) -> list[dict]:
        """Evict from the shared prefill (a copy, unless this is the last cell) and answer; ``rescore``
        scores again first, for a method whose scores depend on the ratio."""
        if rescore:  # the scores were made for another ratio
            with engine.Timer(self.device) as rescoring:  # before any eviction: the shared cache is still whole
                scores = engine.score_layers(self.model, prefilled.cache, method, prefilled.recorder, unit.context,
                                             ratio=ratio)
            scoring_s = rescoring.seconds
        cell = prefilled.cache if consume else prefilled.cache.clone()
        # method state is kept only where it is used again: decode-time eviction
        cell.retain_state(method.name if self.config.evict_during_decoding else None)
        with engine.Timer(self.device) as evict_timer:
            eviction = engine.evict(cell, scores, method, ratio, seen=unit.total)
        return unit.answer_all(replace(prefilled, cache=cell), method, ratio, eviction,
                               scoring_s + evict_timer.seconds, reference)

    def _own_prefill_cell(self, unit: "Unit", method: Method, ratio: float, reference) -> list[dict]:
        """The method's own prefill (into the cache it manages, or evicting after every chunk), then the answers."""
        prefilled, scoring_s = unit.prefill_own(method, ratio)
        eviction = engine.Eviction.held(prefilled.cache, unit.total)
        return unit.answer_all(prefilled, method, ratio, eviction, scoring_s, reference)

    def expected_keys(self, sample: Sample, task_name: str) -> set[tuple]:
        """The result keys a sample's rows will have, to skip samples already written."""
        full = [get_method("full", seed=self.config.seed)] if self.run_baseline else []
        cells = [(m, 0.0) for m in full] + [(m, r) for m in self.methods for r in cell_ratios(m, self.config.ratios)]
        return {
            row_key({**self.meta, "task": task_name, "subtask": sample.subtask, "sample_id": sample.sample_id,
                     "question_id": q.question_id, "method": m.name, "target_ratio": ratio,
                     "method_config": json.dumps(m.config(), sort_keys=True),
                     "evict_during_prefill": self.config.evict_during_prefill,
                     "decode_interval": self.config.decode_interval if self.config.evict_during_decoding else None})
            for q in sample.questions for m, ratio in cells
        }


@dataclass
class Prefilled:
    """A prefilled cache and what scoring needs from the prefill."""

    cache: EvictableCache
    recorder: HiddenRecorder | None
    logits: torch.Tensor  # predicts the token after the prefilled ids
    seconds: float
    recorded_bytes: int  # attention inputs held for scoring, counted in the CPU peak


class Unit:
    """One prefilled unit of a sample: prefill it, answer its questions, build its rows."""

    def __init__(self, runner: "Runner", sample: Sample, task_name: str, context: torch.Tensor,
                 questions: list[Question], question_ids: dict[str, list[int]]):
        self.runner, self.sample, self.context, self.questions = runner, sample, context, questions
        self.question_ids = question_ids
        self.model, self.device, self.config = runner.model, runner.device, runner.config
        self.total = context.shape[1]
        self.common = {
            **runner.meta,
            "task": task_name,
            "subtask": sample.subtask,
            "context_tokens": self.total,
            "sample_id": sample.sample_id,
            "metric": sample.metric,
            "evict_during_prefill": self.config.evict_during_prefill,
            "decode_interval": self.config.decode_interval if self.config.evict_during_decoding else None,
        }

    def cell(self, method: Method, ratio: float, compute) -> list[dict]:
        """Rows of one (method, ratio) cell; an exception (out of memory included) becomes error rows."""
        try:
            return compute()
        except Exception as err:  # noqa: BLE001  (recorded in the rows; the sweep goes on)
            return self.error_rows(method, ratio, err)

    def error_rows(self, method: Method, ratio: float, err: Exception) -> list[dict]:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [{**self.common, "question_id": q.question_id, "method": method.name,
                 "method_config": json.dumps(method.config(), sort_keys=True), "allocation": method.allocation,
                 "target_ratio": ratio, "error": f"{type(err).__name__}: {err}".splitlines()[0][:500]}
                for q in self.questions]

    def _recorder(self, methods: list[Method]) -> HiddenRecorder | None:
        windows = [m.hidden_window() for m in methods]
        keep = None if None in windows else max(windows, default=0)
        return HiddenRecorder(engine.attention_modules(self.model), keep) if keep != 0 else None

    def prefill(self, methods: list[Method]) -> Prefilled:
        """The full cache, recording what the one-shot ``methods`` will score from."""
        cache = engine.new_cache(self.model)
        self.runner.reset_peak()
        recorder = self._recorder(methods)
        with engine.Timer(self.device) as timer:
            logits = engine.prefill(self.model, cache, self.context, 0, self.config.prefill_chunk)
        if recorder:
            recorder.remove()
        return Prefilled(cache, recorder, logits, timer.seconds, recorder.nbytes if recorder else 0)

    def prefill_own(self, method: Method, ratio: float) -> tuple[Prefilled, float]:
        """The method's own prefill: into the cache it manages (KV-Direct), or evicting after every
        chunk (peak memory near the budget). Returns it and the seconds spent scoring and evicting."""
        self.runner.reset_peak()
        if method.manages_cache:
            cache, recorder, evictor = method.new_cache(self.model, self.total, ratio), None, None
        else:
            cache = engine.new_cache(self.model)
            recorder = self._recorder([method])  # only what the method reads: nothing for window and random
            evictor = engine.Evictor(self.model, cache, method, ratio, recorder)
        with engine.Timer(self.device) as timer:
            logits = engine.prefill(self.model, cache, self.context, 0, self.config.prefill_chunk, evictor)
        if recorder:
            recorder.remove()
        if not self.config.evict_during_decoding:
            cache.retain_state(None)
        chunk_bytes = 0 if recorder is None else min(self.config.prefill_chunk, self.total) * \
            self.model.config.hidden_size * self.model.config.num_hidden_layers * cache.layers[0].keys.element_size()
        evict_s = evictor.seconds if evictor else 0.0
        return Prefilled(cache, None, logits, timer.seconds - evict_s, chunk_bytes), evict_s

    def answer(self, cache: EvictableCache, method: Method, ratio: float, question: Question,
               prefill_logits: torch.Tensor) -> tuple[list[int], float, int]:
        """Greedy answer; the cache is left as it was found. Returns tokens, seconds, peak KV bytes."""
        decode_evicts = self.config.evict_during_decoding and method.evicts and not method.manages_cache
        cloned = decode_evicts or not cache.rollback_restores  # the answer changes the cache for good
        work = cache.clone() if cloned else cache
        lengths = work.lengths()
        recorder = self._recorder([method]) if decode_evicts else None
        evictor = engine.Evictor(self.model, work, method, ratio, recorder) if decode_evicts else None
        with engine.Timer(self.device) as timer:
            if self.config.query_aware:
                first, start = prefill_logits, self.total
            else:
                q_ids = torch.tensor([self.question_ids[question.question_id]], device=self.device)
                first, start = engine.forward(self.model, work, q_ids, self.total), self.total + q_ids.shape[1]
            tokens = engine.greedy(self.model, work, first, start, self.sample.max_new_tokens,
                                   self.runner.eos_ids, self.config.decode_interval or 0, evictor)
        if recorder:
            recorder.remove()
        if not cloned:
            work.rollback(lengths)
        return tokens, timer.seconds, work.peak_bytes

    def answer_all(self, prefilled: Prefilled, method: Method, ratio: float, eviction: engine.Eviction,
                   scoring_s: float, reference: dict[str, list[int]] | None) -> list[dict]:
        cache = prefilled.cache
        kept_bytes, physical = cache.kept_bytes(), cache.nbytes
        full_bytes = cache.full_bytes(self.total)
        rows = []
        for question in self.questions:
            tokens, decode_s, kv_peak = self.answer(cache, method, ratio, question, prefilled.logits)
            prediction = self.runner.tokenizer.decode(tokens, skip_special_tokens=True)
            peak, peak_kind = self.runner.peak(kv_peak + prefilled.recorded_bytes)
            match, diverge = token_match(tokens, reference[question.question_id]) if reference else (1.0, None)
            rows.append({
                **self.common,
                "question_id": question.question_id,
                "method": method.name,
                "method_config": json.dumps(method.config(), sort_keys=True),
                "allocation": method.allocation,
                "target_ratio": ratio,
                "measured_ratio": eviction.measured_ratio,
                "kv_bytes_full": full_bytes,
                "kv_bytes_kept": kept_bytes,
                "kv_bytes_physical": physical,
                "peak_mem_bytes": peak,
                "peak_mem_kind": peak_kind,
                "prefill_s": prefilled.seconds,
                "scoring_s": scoring_s,
                "decode_s": decode_s,
                "new_tokens": len(tokens),
                "prediction": prediction,
                "reference": json.dumps(question.references),
                "score": metric_score(self.sample.metric, prediction, question.references,
                                      **self.sample.meta.get("metric_kwargs", {})),
                "token_match": match,
                "first_divergence": diverge,
                "_tokens": tokens,
            })
        return rows


def run(config: RunConfig, log=print) -> Path | None:
    """Validate, load the model once, run this shard's samples, write parquet; returns the part file."""
    methods, task, subtasks = validate(config)
    loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code, log=log)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions and config.length > max_positions:
        raise UsageError(f"--length {config.length} exceeds what {config.model} can hold ({max_positions} positions)")
    for method in methods:  # loads learned weights: missing ones are a one-line error, before any row
        method.setup(loaded.model, loaded.tokenizer)
    runner = Runner(config, loaded, methods)
    samples = []
    for sub in subtasks:
        try:
            samples += list(task.samples([sub], config.samples, loaded.tokenizer, config.length, config.seed))
        except ValueError as err:
            raise UsageError(str(err)) from None
    index, count = config.shard
    samples = samples[index::count]
    done = written_keys(config.out) if config.resume else set()
    todo = [s for s in samples if not runner.expected_keys(s, task.name) <= done]
    cells = sum(len(runner.expected_keys(s, task.name)) for s in todo)
    shard = f", shard {index}/{count}" if count > 1 else ""
    log(f"kvbench: {len(todo)} samples ({len(samples) - len(todo)} already written{shard}) × methods "
        f"{','.join(config.methods)} × ratios {','.join(map(str, config.ratios))} = {cells} rows "
        f"on {runner.meta['device']} ({runner.meta['dtype']})")
    with tqdm(total=cells, unit="row", disable=None, dynamic_ncols=True) as bar:
        for sample in todo:
            rows = [r for r in runner.run_sample(sample, task.name) if row_key(r) not in done]
            runner.writer.add(rows)
            bar.update(len(rows))
            scores = " | ".join(f"{r['method']}@{r['target_ratio']:g} "
                                + ("error" if r.get("error") else f"{r['score']:.0f}") for r in rows)
            bar.write(f"{task.name}:{sample.subtask} {sample.sample_id}: {scores}")
    if not runner.writer.rows:
        log("kvbench: nothing to do: every row is already written")
        return None
    frame = summarize(pd.DataFrame(runner.writer.rows))
    log("\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    log(f"\nkvbench: wrote {len(runner.writer.rows)} rows to {runner.writer.path}")
    return runner.writer.path
