"""The compression pipeline, in the order it runs: prefill → score → evict → answer → roll back.

Every driver — the runner behind ``kvbench run`` and ``kvbench sweep``, the lm-eval model, the
benchmarks, the training targets — goes through a :class:`Session`; nothing else strings these
steps together. One context's cache is prefilled once; each method scores it once; every budget is
cut from those scores; every question is answered from the cut cache, which is rolled back after
each answer. A method that evicts while the context is prefilled, or that manages its own cache
(KV-Direct), gets a prefill of its own (:meth:`Session.compress`).

Memory accounting (CPU, where nothing measures allocations for us): a compressed cache's
``peak_bytes`` is the high-water mark of the KV cache while it was made — the prefill, raised by
the method's own scoring forwards (KVzip) — plus the method's own state and the attention inputs
it kept for scoring; answering raises it to the cache's high-water mark while decoding. Methods
that share one prefill are charged only their own state, so a sweep's rows equal separate runs'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from kvbench.core import batch, engine
from kvbench.core.attention import DECODE_KERNELS, layer_rotaries
from kvbench.core.budget import Budget
from kvbench.core.cache import EvictableCache
from kvbench.core.engine import Eviction, Timer
from kvbench.core.method import Method
from kvbench.core.prompts import Layout
from kvbench.core.scoring import HiddenRecorder, ScoreStream


@dataclass
class Prefill:
    """A context prefilled into the full cache, with what the methods sharing it score from."""

    cache: EvictableCache
    ids: torch.Tensor  # (1, T) the context
    logits: torch.Tensor  # predicts the token after the context
    seconds: float
    stream: ScoreStream | None  # scores of the methods that read every token's attention input
    recorder: HiddenRecorder | None  # the last attention inputs, for methods that read a window
    peak_kv_bytes: int  # the cache's high-water mark, method state left out
    layout: Layout = Layout()  # the template prefix (protected) and the question (query-aware) in ids

    @property
    def tokens(self) -> int:
        return self.ids.shape[1]


@dataclass
class Scored:
    """One method's per-layer scores of a shared prefill, and what scoring cost."""

    method: Method
    scores: list[torch.Tensor]
    seconds: float
    peak_bytes: int  # the prefill's KV high-water mark raised by this method's scoring, plus its state and inputs


@dataclass
class Compressed:
    """A context's cache as one method left it under one budget: what every answer starts from."""

    cache: EvictableCache
    logits: torch.Tensor  # predicts the token after the context
    tokens: int  # context tokens
    method: Method
    budget: Budget | None  # None: the full cache
    eviction: Eviction
    prefill_s: float
    scoring_s: float
    peak_bytes: int
    layout: Layout = Layout()  # what every later eviction of this cache protects
    kv_bytes_full: int = 0
    kv_bytes_kept: int = 0
    kv_bytes_physical: int = 0

    def __post_init__(self) -> None:
        self.kv_bytes_full = self.cache.full_bytes(self.tokens)
        self.kv_bytes_kept = self.cache.kept_bytes()
        self.kv_bytes_physical = self.cache.nbytes
        self.cache.reset_peak()  # answering measures its own high-water mark from here

    @property
    def decode_evicts(self) -> bool:
        return self.budget is not None and self.method.evicts and not self.method.manages_cache


@dataclass
class Answer:
    tokens: list[int]
    seconds: float
    peak_bytes: int  # the compressed cache's peak, raised by answering


def _streamed(method: Method) -> bool:
    """Methods that read every token's attention input and can score it chunk by chunk are scored
    inside the forward; the others that read every input (kvpress's whole-prompt scorers) get it
    recorded, and are charged for it."""
    return method.evicts and method.hidden_window() is None and method.incremental


def _window(method: Method, layout: Layout) -> int | None:
    """The trailing attention inputs ``method`` reads in this unit: its own window, or the question
    (FINCH) when it reads that."""
    window = method.hidden_window()
    return max(window, layout.question) if window is not None and method.reads_question else window


class Session:
    """One loaded model's pipeline. ``decode_interval``: with ``evict_while_decoding``, tokens
    between evictions while answering (None: never). ``layout``, ``decode_slack``: how the caches
    it makes are stored (:func:`kvbench.core.engine.new_cache`). ``decode_kernels``: what each
    answer token's attention runs through (``kvbench.core.attention.DECODE_KERNELS``)."""

    def __init__(self, model: PreTrainedModel, prefill_chunk: int = 512, eos_ids: set[int] | None = None,
                 decode_interval: int | None = None, layout: str = "packed",
                 decode_slack: int = engine.DEFAULT_DECODE_SLACK, decode_kernels: str = "auto"):
        if decode_kernels not in DECODE_KERNELS:
            raise ValueError(f"unknown decode kernels {decode_kernels!r}; choose one of {', '.join(DECODE_KERNELS)}")
        self.decode_kernels = decode_kernels
        self.model = model
        self.layout, self.decode_slack = layout, decode_slack
        self.device = next(model.parameters()).device
        self.prefill_chunk = prefill_chunk
        self.eos_ids = set(eos_ids or ())
        self.decode_interval = decode_interval
        self.modules = engine.attention_modules(model)

    def new_cache(self) -> EvictableCache:
        return engine.new_cache(self.model, self.layout, self.decode_slack, self.decode_kernels)

    # -- one context, shared by several methods -------------------------------------------------

    def prefill(self, ids: torch.Tensor, methods: list[Method] = (), record_inputs: bool = False,
                layout: Layout = Layout()) -> Prefill:
        """The full cache of ``ids``; methods that read attention inputs are scored while it fills.

        ``record_inputs`` keeps every layer's attention inputs of every token (training targets need
        them all); otherwise only the window the ``methods`` read is kept. ``layout`` says where the
        template prefix and the question lie in ``ids``: every cut protects the prefix.
        """
        cache = self.new_cache()
        cache.count_state = False  # several methods may keep state here: each is charged its own
        self.reset_device_peak()
        windows = [_window(m, layout) for m in methods if m.evicts and not _streamed(m)]
        keep = None if record_inputs or None in windows else max(windows, default=0)
        recorder = HiddenRecorder(self.modules, keep) if keep != 0 else None
        stream = ScoreStream(self.modules, cache, [m for m in methods if _streamed(m)], layer_rotaries(self.model))
        try:
            with Timer(self.device) as timer:
                logits = engine.prefill(self.model, cache, ids, 0, self.prefill_chunk)
        finally:
            stream.remove()
            if recorder:
                recorder.remove()
        prefill_s = timer.seconds - sum(stream.seconds.values())  # scoring inside the forward is scoring
        return Prefill(cache, ids, logits, prefill_s, stream, recorder, cache.peak_kv_bytes, layout)

    def full(self, prefill: Prefill, method: Method) -> Compressed:
        """The full cache itself, as the ``full`` baseline answers from it (rolled back after each answer)."""
        cache = prefill.cache
        return Compressed(cache, prefill.logits, prefill.tokens, method, None, Eviction(1, 1), prefill.seconds,
                          0.0, prefill.peak_kv_bytes, prefill.layout)

    def score(self, prefill: Prefill, method: Method, budget: Budget | None = None) -> Scored:
        """``method``'s scores of the shared prefill: streamed during it, or computed now (for a
        method whose scores depend on the ratio, for ``budget``'s)."""
        cache = prefill.cache
        cache.peak_kv_bytes = prefill.peak_kv_bytes  # this method's scoring forwards (KVzip) count for it alone
        ratio = budget.ratio if budget is not None else None
        with Timer(self.device) as timer:
            scores = engine.score_layers(self.model, cache, method, prefill.ids, prefill.stream, prefill.recorder,
                                         ratio, prefill.layout.question)
        streamed = prefill.stream.seconds.get(method.state_prefix, 0.0) if prefill.stream else 0.0
        window = _window(method, prefill.layout)
        reads_recorded = prefill.recorder is not None and window != 0 and not _streamed(method)
        inputs = prefill.recorder.nbytes_of_last(window) if reads_recorded else 0
        peak = cache.peak_kv_bytes + cache.state_bytes(method.state_prefix) + inputs
        cache.peak_kv_bytes = prefill.peak_kv_bytes
        return Scored(method, scores, timer.seconds + streamed, peak)

    def cut(self, prefill: Prefill, scored: Scored, budget: Budget, evict_while_decoding: bool = False,
            consume: bool = False) -> Compressed:
        """Evict from the shared prefill under ``budget``: from a copy, unless ``consume`` (the last cut)."""
        method = scored.method
        cache = prefill.cache if consume else prefill.cache.clone()
        # method state stays only where it is used again: eviction while answering
        cache.retain_state(method.state_prefix if evict_while_decoding else None)
        with Timer(self.device) as timer:
            eviction = engine.evict(cache, scored.scores, method, budget, prefill.tokens, prefill.layout)
        return Compressed(cache, prefill.logits, prefill.tokens, method, budget, eviction, prefill.seconds,
                          scored.seconds + timer.seconds, scored.peak_bytes, prefill.layout)

    # -- one context, one method ----------------------------------------------------------------

    def compress(self, ids: torch.Tensor, method: Method, budget: Budget, evict_during_prefill: bool = False,
                 evict_while_decoding: bool = False, layout: Layout = Layout()) -> Compressed:
        """``ids`` prefilled and compressed by ``method`` alone.

        A method that manages its own cache fills it; with ``evict_during_prefill`` the method evicts
        after every chunk, so the cache never holds much more than the budget; otherwise the context
        is prefilled, scored and cut once. Every eviction, then and while answering, protects
        ``layout``'s template prefix.
        """
        if not method.evicts:
            return self.full(self.prefill(ids, layout=layout), method)
        if not (method.manages_cache or evict_during_prefill):
            prefill = self.prefill(ids, [method], layout=layout)
            return self.cut(prefill, self.score(prefill, method, budget), budget, evict_while_decoding, consume=True)
        self.reset_device_peak()
        evictor = feeds = None
        if method.manages_cache:
            cache = method.new_cache(self.model, ids.shape[1], budget.ratio)
        else:
            cache = self.new_cache()
            evictor, feeds = self.evictor(cache, method, budget, layout)
        try:
            with Timer(self.device) as timer:
                logits = engine.prefill(self.model, cache, ids, 0, self.prefill_chunk, evictor)
        finally:
            for feed in feeds or ():
                feed.remove()
        if not evict_while_decoding:
            cache.retain_state(None)
        scoring_s = (evictor.seconds + sum(evictor.stream.seconds.values())) if evictor else 0.0
        return Compressed(cache, logits, ids.shape[1], method, budget, Eviction.held(cache, ids.shape[1]),
                          timer.seconds - scoring_s, scoring_s, cache.peak_bytes, layout)

    def evictor(self, cache: EvictableCache, method: Method, budget: Budget, layout: Layout = Layout(),
                decoding: bool = False) -> tuple[engine.Evictor, list]:
        """An evictor for eviction while the cache fills (``decoding``: while answering), with what
        feeds the method's scoring: a stream (every token's input, scored in the forward) or a
        recorder of its last inputs."""
        stream = ScoreStream(self.modules, cache, [method] if _streamed(method) else [], layer_rotaries(self.model))
        window = method.hidden_window()
        recorder = HiddenRecorder(self.modules, window) if window and not _streamed(method) else None
        evictor = engine.Evictor(self.model, cache, method, budget, stream, recorder, layout, decoding)
        return evictor, [f for f in (stream, recorder) if f]

    def extend(self, compressed: Compressed, ids: torch.Tensor) -> None:
        """Feed ``ids`` into the compressed cache for good (the prompt token lm-eval holds back)."""
        compressed.logits = engine.forward(self.model, compressed.cache, ids, compressed.tokens)
        compressed.tokens += ids.shape[1]

    # -- answering -------------------------------------------------------------------------------

    @torch.inference_mode()
    def answer(self, compressed: Compressed, question_ids: list[int] | None, max_new_tokens: int,
               evict_while_decoding: bool = False, stop: list[str] = (),
               decode: Callable[[list[int]], str] | None = None) -> Answer:
        """Greedy answer to ``question_ids`` (None: the question was compressed with the context) from
        the compressed cache, which is left as it was found.

        With ``stop`` strings (and ``decode``, tokens → text) decoding ends at the first token that
        completes one. With ``evict_while_decoding`` the method re-scores and evicts every
        ``decode_interval`` tokens.
        """
        method, budget = compressed.method, compressed.budget
        decode_evicts = evict_while_decoding and compressed.decode_evicts and self.decode_interval
        cloned = bool(decode_evicts) or not compressed.cache.rollback_restores  # the answer changes it for good
        work = compressed.cache.clone() if cloned else compressed.cache
        work.reset_peak()
        work.decode_kernels = self.decode_kernels
        lengths = work.lengths()
        evictor, feeds = self.evictor(work, method, budget, compressed.layout, decoding=True) if decode_evicts \
            else (None, [])
        try:
            with Timer(self.device) as timer:
                if question_ids is None:
                    first, start = compressed.logits, compressed.tokens
                else:
                    q_ids = torch.tensor([question_ids], device=self.device)
                    first = engine.forward(self.model, work, q_ids, compressed.tokens)
                    start = compressed.tokens + q_ids.shape[1]
                tokens = self._greedy(work, first, start, max_new_tokens, evictor, stop, decode)
        finally:
            for feed in feeds:
                feed.remove()
        peak = max(compressed.peak_bytes, work.peak_bytes)
        if not cloned:
            work.rollback(lengths)
        return Answer(tokens, timer.seconds, peak)

    @torch.inference_mode()
    def answer_batch(self, cells: list[Compressed], question_ids: list[int] | None, max_new_tokens: int,
                     stop: list[str] = (), decode: Callable[[list[int]], str] | None = None) -> list[Answer]:
        """The answers :meth:`answer` gives each of ``cells`` (compressed caches of one context,
        :func:`kvbench.core.batch.batchable`), decoded together as one batch; the cells' caches are
        left as they were (the batch decodes from a stacked copy).

        Time: stacking and the question's prefill are split evenly among the rows, each decoding
        step among the rows still decoding in it, so the rows' seconds add up to the batch's wall
        time. Memory: a row's peak is its cell's, raised to every cell's cache held meanwhile plus
        the stacked batch's high-water mark (on CUDA, :meth:`peak` measures all of it anyway).
        """
        room = (len(question_ids) if question_ids is not None else 0) + max_new_tokens
        held = sum({id(c.cache): c.cache.nbytes for c in cells}.values())
        with Timer(self.device) as stacking:
            stacked = batch.stack([c.cache for c in cells], room)
        stacked.decode_kernels = self.decode_kernels
        start = cells[0].tokens
        if any(c.tokens != start for c in cells):
            raise ValueError("a batch decodes cells of one context: their token counts differ")
        with Timer(self.device) as question:
            if question_ids is None:
                first = torch.cat([c.logits for c in cells])
            else:
                ids = torch.tensor([question_ids] * len(cells), device=self.device)
                first = engine.forward(self.model, stacked, ids, start)
                start += len(question_ids)
        stop_at = (lambda tokens, checked: _stop_at(tokens, checked, stop, decode)) if stop else None
        decoded = batch.greedy(self.model, stacked, first, start, max_new_tokens, self.eos_ids, stop_at)
        shared = (stacking.seconds + question.seconds) / len(cells)
        return [Answer(tokens, shared + seconds, max(c.peak_bytes, held + stacked.peak_bytes))
                for c, (tokens, seconds) in zip(cells, decoded)]

    def _greedy(self, cache: EvictableCache, first: torch.Tensor, start: int, max_new: int,
                evictor: engine.Evictor | None, stop: list[str], decode) -> list[int]:
        """Greedy tokens; with stop strings, in growing chunks checked after each (the same tokens
        as one call, since every chunk continues exactly where the last one stopped)."""
        every = self.decode_interval or 0
        if not stop:
            return engine.greedy(self.model, cache, first, start, max_new, self.eos_ids, every, evictor)
        tokens: list[int] = []
        logits, position, chunk = first, start, engine.STOP_CHECK_FIRST
        while len(tokens) < max_new:
            n = min(chunk, max_new - len(tokens))
            new = engine.greedy(self.model, cache, logits, position, n, self.eos_ids, every, evictor,
                                already=len(tokens))
            tokens += new
            cut = _stop_at(tokens, len(tokens) - len(new), stop, decode)
            if cut is not None:
                return tokens[:cut]
            if len(new) < n or len(tokens) >= max_new:
                break
            # greedy chose the chunk's last token but did not run it
            logits = engine.forward(self.model, cache, torch.tensor([[new[-1]]], device=self.device),
                                    position + n - 1)
            if evictor is not None and every and len(tokens) % every == 0:
                evictor(position + n)
            position += n
            chunk *= 2
        return tokens

    @torch.inference_mode()
    def continuation_logprob(self, compressed: Compressed, continuation: list[int]) -> tuple[float, bool]:
        """Sum of the log-probabilities of ``continuation`` after the compressed context, and whether
        greedy decoding would have produced it (lm-eval's loglikelihood); the cache is left as found."""
        work = compressed.cache if compressed.cache.rollback_restores else compressed.cache.clone()
        work.decode_kernels = self.decode_kernels
        lengths = work.lengths()
        logits = [compressed.logits]
        try:
            for offset, token in enumerate(continuation[:-1]):
                ids = torch.tensor([[token]], device=self.device)
                logits.append(engine.forward(self.model, work, ids, compressed.tokens + offset))
        finally:
            if work is compressed.cache:
                work.rollback(lengths)
        logprobs = torch.cat(logits).float().log_softmax(dim=-1)
        target = torch.tensor(continuation, device=logprobs.device)
        return float(logprobs.gather(1, target.unsqueeze(1)).sum()), bool((logprobs.argmax(dim=-1) == target).all())

    # -- device memory -------------------------------------------------------------------------

    def reset_device_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self, cpu_bytes: int) -> tuple[int, str]:
        """CUDA: every allocation since the last prefill began (weights included). CPU: ``cpu_bytes``,
        the KV cache's high-water mark with the method's own state and scoring inputs."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device), "cuda_max_allocated"
        return cpu_bytes, "kv_cache+scoring_inputs"


def _stop_at(tokens: list[int], checked: int, stop: list[str], decode) -> int | None:
    """The fewest tokens whose text contains a stop string (None if none does), looking only at
    prefixes longer than ``checked`` (shorter ones were checked before)."""
    if not any(s in decode(tokens) for s in stop if s):
        return None
    for count in range(max(checked, 1), len(tokens) + 1):
        if any(s in decode(tokens[:count]) for s in stop if s):
            return count
    return len(tokens)
