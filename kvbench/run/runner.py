"""One process: load the model once, then for every sample run the pipeline and record its rows.

For each context the runner prefills the full cache once, answers every question with it (the
``full`` baseline, whose tokens also define ``token_match``), then lets every method score that same
cache once and cuts every requested budget from those scores — no second prefill. Methods that
evict during prefill or manage their own cache get their own prefill. With ``query_aware`` the
question is part of what is prefilled and compressed, so there is one prefill per question. The
steps themselves are :class:`kvbench.core.session.Session`'s; this module turns them into rows.

With ``decode_batch`` above 1 the cells of a context are not answered one by one: each cell's
compressed cache is held until the context's cells are all made (or until the held caches reach
:func:`kvbench.core.batch.memory_cap`), then up to ``decode_batch`` cells at a time are decoded as
one batch (:meth:`Session.answer_batch`). Cells that change their cache while answering (eviction
while decoding, KV-Direct) are answered one at a time as before.
"""

from __future__ import annotations

import json
import traceback
import uuid
from datetime import datetime, timezone

import torch
import transformers

import kvbench
from kvbench.core import attention, batch, engine
from kvbench.core.budget import Budget
from kvbench.core.method import Method
from kvbench.core.prompts import Layout, split_prompt
from kvbench.core.sliding import sliding_window
from kvbench.core.session import Answer, Compressed, Prefill, Scored, Session
from kvbench.core.task import Question, Sample, cut_at_stop
from kvbench.models import LoadedModel
from kvbench.plugins import get_method
from kvbench.results import git_sha, row_key
from kvbench.run.config import Plan, RunConfig
from kvbench.tasks.metrics import score as metric_score


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


def error_line(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:500]


def release_failed_cell(err: Exception, device: torch.device) -> None:
    """Free what a failed cell held before the next one starts: the exception's traceback keeps the
    failing frames, and with them the cell's tensors (a clone of the cache, scoring buffers), alive
    for as long as it is handled; then return CUDA's cached blocks, so after an out-of-memory error
    the next cell finds the memory the failed one took."""
    traceback.clear_frames(err.__traceback__)
    err.__traceback__ = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """Holds the loaded model and its session, and turns each sample it is given into rows."""

    def __init__(self, config: RunConfig, loaded: LoadedModel, plan: Plan):
        self.config, self.loaded, self.plan = config, loaded, plan
        self.tokenizer = loaded.tokenizer
        self.full = get_method("full", seed=config.seed)
        self.own_prefill = [m for m in plan.methods if m.manages_cache or config.evict_during_prefill]
        self.one_shot = [m for m in plan.methods if m not in self.own_prefill]
        self.run_baseline = config.baseline
        attention.install(loaded.model)
        self.session = Session(loaded.model, config.prefill_chunk, engine.eos_ids(loaded.model, loaded.tokenizer),
                               config.decode_interval, layout=config.cache_layout, decode_kernels=config.kernels)
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        device = loaded.device
        self.meta = {
            "run_id": self.run_id,
            "command": config.command,
            "git_sha": git_sha(),
            "kvbench_version": kvbench.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "model": loaded.name,
            "query_aware": config.query_aware,
            "prefill_chunk": config.prefill_chunk,
            "requested_length": config.length,
            "seed": config.seed,
            "evict_during_prefill": config.evict_during_prefill,
            "decode_interval": config.decode_interval if config.evict_during_decoding else None,
            "decode_batch": config.decode_batch,
        }

    def cells(self) -> list[tuple[Method, Budget | None]]:
        full = [(self.full, None)] if self.run_baseline else []
        return full + [(m, b) for m in self.plan.methods for b in self.plan.budgets(m)]

    def expected_keys(self, sample: Sample, task_name: str) -> set[tuple]:
        """The result keys a sample's rows will have, to skip samples already written."""
        return {row_key({**self.meta, "task": task_name, "subtask": sample.subtask, "sample_id": sample.sample_id,
                         "question_id": q.question_id, **_method_columns(m, b, self.session.model)})
                for q in sample.questions for m, b in self.cells()}

    def run_sample(self, sample: Sample, task_name: str) -> list[dict]:
        parts = split_prompt(self.tokenizer, sample.context, sample.chat_template)
        question_ids = {q.question_id: parts.question_ids(self.tokenizer, q.text, q.answer_prefix)
                        for q in sample.questions}
        if self.config.query_aware:  # question inside what is compressed: one prefill per question
            units = [(parts.context_ids + question_ids[q.question_id], [q], None,
                      Layout(parts.prefix_tokens, len(question_ids[q.question_id]))) for q in sample.questions]
        else:
            units = [(parts.context_ids, sample.questions, question_ids, Layout(parts.prefix_tokens))]
        common = {**self.meta, "task": task_name, "subtask": sample.subtask, "sample_id": sample.sample_id,
                  "metric": sample.metric, "needle_depth": sample.needle_depth}
        rows = []
        for ids, questions, asked, layout in units:
            unit = Unit(self, sample, torch.tensor([ids], device=self.loaded.device), questions, asked,
                        {**common, "context_tokens": len(ids)}, layout)
            rows += unit.rows()
        return rows


class Unit:
    """One prefilled unit of a sample — its context (query-aware: context + one question) — and its rows.
    ``layout``: the chat template's prefix, protected by every method but ``random``, and the question."""

    def __init__(self, runner: Runner, sample: Sample, ids: torch.Tensor, questions: list[Question],
                 question_ids: dict[str, list[int]] | None, common: dict, layout: Layout = Layout()):
        self.runner, self.sample, self.ids, self.questions = runner, sample, ids, questions
        self.layout = layout
        self.question_ids, self.common = question_ids, common
        self.session, self.config = runner.session, runner.config
        self.reference: dict[str, list[int]] = {}  # the full cache's answer tokens, for token_match
        # cells held for batched decoding, each with the list its rows go into once answered
        self.pending: list[tuple[Compressed, list[dict]]] = []

    def rows(self) -> list[dict]:
        parts: list[list[dict]] = []  # per cell, in order: filled now, or when its batch is answered
        if self.runner.run_baseline or self.runner.one_shot:
            try:
                prefill = self.session.prefill(self.ids, self.runner.one_shot, layout=self.layout)
            except Exception as err:  # noqa: BLE001  (out of memory included: record it, go on)
                parts.append([r for m, b in self.runner.cells() if m in self.runner.one_shot or not m.evicts
                              for r in self.error_rows(m, b, err)])
                prefill = None
            if prefill is not None:
                if self.runner.run_baseline:
                    parts.append(self.cell(self.runner.full, None,
                                           lambda: self.session.full(prefill, self.runner.full)))
                parts += self._one_shot_rows(prefill)
        parts += self._own_prefill_rows()
        self.flush()
        return [row for part in parts for row in part]

    def _one_shot_rows(self, prefill: Prefill) -> list[list[dict]]:
        """Every one-shot method scores the shared prefill once; every budget is cut from its scores.
        The last cut consumes the shared cache, unless the full cell, held for a batch, still reads it."""
        rows: list[list[dict]] = []
        one_shot = self.runner.one_shot
        for index, method in enumerate(one_shot):
            budgets = self.runner.plan.budgets(method)
            try:
                scored = self.session.score(prefill, method, budgets[0])
            except Exception as err:  # noqa: BLE001
                rows += [self.error_rows(method, b, err) for b in budgets]
                continue
            for b_index, budget in enumerate(budgets):
                last = index == len(one_shot) - 1 and b_index == len(budgets) - 1
                rows.append(self.cell(method, budget, lambda: self.session.cut(
                    prefill, self._scored(prefill, scored, budget, b_index), budget,
                    self.config.evict_during_decoding, consume=last and not self._holds(prefill.cache))))
        return rows

    def _scored(self, prefill: Prefill, scored: Scored, budget: Budget, index: int) -> Scored:
        """A method whose scores depend on the ratio is scored again for every budget after the
        first (before any cut consumes the shared cache, which is still whole)."""
        if index == 0 or not scored.method.ratio_dependent():
            return scored
        return self.session.score(prefill, scored.method, budget)

    def _own_prefill_rows(self) -> list[list[dict]]:
        return [self.cell(method, budget, lambda: self.session.compress(
                    self.ids, method, budget, self.config.evict_during_prefill, self.config.evict_during_decoding,
                    self.layout))
                for method in self.runner.own_prefill for budget in self.runner.plan.budgets(method)]

    def cell(self, method: Method, budget: Budget | None, compress) -> list[dict]:
        """Rows of one (method, budget) cell; an exception (out of memory included) becomes error rows.
        A cell that can be batched is held, and its (returned) list filled by :meth:`flush`; one that
        cannot is answered at once, after the cells held so far."""
        try:
            compressed = compress()
            if self.config.decode_batch > 1 and batch.batchable(compressed, self.config.evict_during_decoding,
                                                                 self.session.decode_interval):
                rows: list[dict] = []
                self.pending.append((compressed, rows))
                held = sum({id(c.cache): c.cache.nbytes for c, _ in self.pending}.values())
                if held >= batch.memory_cap(self.session.device):
                    self.flush()
                return rows
            self.flush()  # the held full cell's answers are this cell's token_match reference
            return [self.answer_row(compressed, q) for q in self.questions]
        except Exception as err:  # noqa: BLE001  (recorded in the rows; the sweep goes on)
            return self.error_rows(method, budget, err)

    def _holds(self, cache) -> bool:
        return any(compressed.cache is cache for compressed, _ in self.pending)

    def flush(self) -> None:
        """Answer the held cells, up to ``decode_batch`` at a time within the memory cap. A batch that
        fails (out of memory) leaves its cells to be answered one at a time."""
        pending, self.pending = self.pending, []
        if not pending:
            return
        cells = [compressed for compressed, _ in pending]
        room = max((len(ids) for ids in (self.question_ids or {}).values()), default=0) + self.sample.max_new_tokens
        cap = batch.memory_cap(self.session.device)
        answers: dict[tuple[int, str], Answer] = {}
        for group in batch.groups([c.cache for c in cells], room, self.config.decode_batch, cap):
            try:
                for question in self.questions:
                    answered = self.session.answer_batch([cells[i] for i in group], self._asked(question),
                                                         self.sample.max_new_tokens, self.sample.stop, self._decode)
                    answers.update({(i, question.question_id): a for i, a in zip(group, answered)})
            except Exception as err:  # noqa: BLE001  (the cells are answered one at a time below)
                release_failed_cell(err, self.session.device)
        # the full cache's answers first: they are every other row's token_match reference
        for index in sorted(range(len(pending)), key=lambda i: cells[i].budget is not None):
            compressed, rows = pending[index]
            try:
                rows += [self.answer_row(compressed, q, answers.get((index, q.question_id))) for q in self.questions]
            except Exception as err:  # noqa: BLE001
                rows += self.error_rows(compressed.method, compressed.budget, err)

    def _asked(self, question: Question) -> list[int] | None:
        return None if self.question_ids is None else self.question_ids[question.question_id]

    def answer_row(self, compressed: Compressed, question: Question, answer: Answer | None = None) -> dict:
        """The row of ``question`` answered from ``compressed``: by ``answer`` (a batch's), or now."""
        if answer is None:
            answer = self.session.answer(compressed, self._asked(question), self.sample.max_new_tokens,
                                         self.config.evict_during_decoding, self.sample.stop, self._decode)
        if compressed.budget is None:
            self.reference[question.question_id] = answer.tokens
        return self.row(compressed, question, answer)

    def _decode(self, tokens: list[int]) -> str:
        return self.runner.tokenizer.decode(tokens, skip_special_tokens=True)

    def row(self, compressed: Compressed, question: Question, answer: Answer) -> dict:
        prediction = cut_at_stop(self._decode(answer.tokens), self.sample.stop)
        reference = self.reference.get(question.question_id) if self.runner.run_baseline else None
        match, diverge = token_match(answer.tokens, reference) if reference is not None else (None, None)
        peak, peak_kind = self.session.peak(answer.peak_bytes)
        return {
            **self.common,
            "question_id": question.question_id,
            **_method_columns(compressed.method, compressed.budget, self.session.model),
            "measured_ratio": compressed.eviction.measured_ratio,
            "kv_bytes_full": compressed.kv_bytes_full,
            "kv_bytes_kept": compressed.kv_bytes_kept,
            "kv_bytes_physical": compressed.kv_bytes_physical,
            "peak_mem_bytes": peak,
            "peak_mem_kind": peak_kind,
            "prefill_s": compressed.prefill_s,
            "scoring_s": compressed.scoring_s,
            "decode_s": answer.seconds,
            "new_tokens": len(answer.tokens),
            "prediction": prediction,
            "reference": json.dumps(question.references),
            "score": metric_score(self.sample.metric, prediction, question.references,
                                  **self.sample.meta.get("metric_kwargs", {})),
            "token_match": match,
            "first_divergence": diverge,
        }

    def error_rows(self, method: Method, budget: Budget | None, err: Exception) -> list[dict]:
        line = error_line(err)
        release_failed_cell(err, self.session.device)
        return [{**self.common, "question_id": q.question_id, **_method_columns(method, budget, self.session.model),
                 "error": line} for q in self.questions]


def _method_columns(method: Method, budget: Budget | None, model) -> dict:
    """The columns that say which method and budget a row measures (part of its key). On a model
    with sliding-window layers (Gemma 3), ``method_config`` also names the layers eviction cuts
    (``compressed_layers``): ratios and budgets are over those alone."""
    config = method.config()
    windows = [sliding_window(attn) for attn in engine.attention_modules(model)]
    if any(w is not None for w in windows):
        config["compressed_layers"] = [i for i, w in enumerate(windows) if w is None]
    return {
        "method": method.name,
        "method_spec": method.spec(),
        "method_config": json.dumps(config, sort_keys=True),
        "allocation": method.allocation,
        "target_ratio": 0.0 if budget is None else budget.ratio,
    }
