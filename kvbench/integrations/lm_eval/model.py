"""kvbench as a model of lm-evaluation-harness: ``lm_eval --model kvbench --model_args
pretrained=...,method=snapkv,ratio=0.5 --tasks ...``.

Every request's prompt is prefilled, scored by the method and evicted down to ``ratio`` before the
continuation is scored (``loglikelihood``) or generated (``generate_until``). lm-eval prompts hold
the question, so this is kvbench's **query-aware** setting: the method sees the question
when it chooses what to keep. The prompt's last token is held back and run against the compressed
cache (``first_token=compressed``), so the first answer token, often the whole answer of a
multiple-choice task, is predicted from what was kept; ``first_token=prefill`` takes those logits
from the full prefill instead, as ``kvbench run --query-aware`` does, and then one-token answers
never change. Eviction happens once, after the prompt's prefill (no eviction during decoding).

Requests run one at a time (batch size 1, whatever ``--batch_size`` says); the requests of one
multiple-choice question share their prompt, so it is prefilled and compressed once and each choice
is scored against that cache, which is rolled back in between.

Registration: the class carries lm-eval's ``@register_model("kvbench")``, so importing this module
makes ``--model kvbench`` resolve; pyproject.toml also declares it in the ``lm_eval.models``
entry-point group, which lm-eval releases with plugin discovery (after 0.4.13) read on their own.
lm-eval 0.4.13 discovers no out-of-tree model, so there ``kvbench lm-eval ARGS`` (lm-eval's CLI
with this module imported) or ``import kvbench.integrations.lm_eval.model`` before ``simple_evaluate`` does it.

Per-document costs (context tokens, measured ratio, KV bytes, times) are returned by
:meth:`KVBenchLM.get_model_info`, which lm-eval stores in the results JSON under
``config.kvbench``; ``kvbench import-lm-eval`` turns them, with the logged samples, into rows.
"""

from __future__ import annotations

import sys
from collections import defaultdict

# lm-eval 0.4.13 lists its built-in models only while its registry is empty: import them before
# registering kvbench, or hf, vllm, ... would vanish from this process
import lm_eval.models  # noqa: F401
import torch
import transformers
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

import kvbench
from kvbench.core import attention, engine
from kvbench.core.budget import ALLOCATIONS, Budget
from kvbench.core.method import Method
from kvbench.core.prompts import Layout, render_chat, template_prefix_length
from kvbench.core.session import Compressed, Session
from kvbench.integrations.lm_eval.costs import DocumentCosts
from kvbench.models import DEFAULT_MODEL, load_model
from kvbench.plugins import SpecError, build_method, list_methods
from kvbench.results import git_sha

MODEL_NAME = "kvbench"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default when a task names none
FIRST_TOKEN = ("compressed", "prefill")  # where the first continuation token's logits come from


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def make_method(name: str, ratio: float, allocation: str | None, seed: int, options: dict) -> tuple[Method, Budget]:
    """The method and budget ``model_args`` ask for; every mistake is a one-line ValueError."""
    if name not in list_methods():
        raise ValueError(f"unknown kvbench method {name!r} (known: {', '.join(list_methods())})")
    if allocation is not None:
        if allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {allocation!r}; kvbench has {', '.join(ALLOCATIONS)}")
        options = {**options, "allocation": allocation}
    try:
        method = build_method(name, options, {"seed": seed})
        budget = Budget(None if method.threshold_mode else ratio, method.allocation)
    except (SpecError, ValueError) as err:
        raise ValueError(str(err).replace("the context", "the prompt's KV")) from None
    if method.threshold_mode and ratio > 0:
        raise ValueError(f"{name} evicts by threshold and measures the ratio: leave ratio out"
                         + (" (kvzap_ratio cuts KVzap's scores to a ratio)" if name == "kvzap" else ""))
    if method.reads_question:
        raise ValueError(f"{name}'s window is the question, which an lm-eval prompt does not mark: "
                         f"set window_size=N to use the prompt's last N tokens")
    if not method.evicts and ratio > 0:
        raise ValueError(f"method {name!r} evicts nothing: use ratio=0 (or pick an eviction method)")
    return method, budget


@register_model(MODEL_NAME)
class KVBenchLM(TemplateLM):
    """An lm-eval model whose prompt KV cache is compressed by a kvbench method before answering.

    ``model_args``: ``pretrained`` (a kvbench alias, local folder or hub id), ``method``, ``ratio``
    (fraction of the prompt's KV entries evicted), ``allocation`` (the method's default when left
    out), ``first_token`` (``compressed`` or ``prefill``, see the module), ``dtype``,
    ``prefill_chunk``, ``max_length``, ``max_gen_toks``, ``add_bos_token``, ``trust_remote_code``,
    ``seed``; any other key is a method option (``window_size=32`` for snapkv).
    """

    def __init__(self, pretrained: str = DEFAULT_MODEL, method: str = "full", ratio: float = 0.0,
                 allocation: str | None = None, device: str | None = None, dtype: str | None = None,
                 prefill_chunk: int = 512, max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool | None = None, first_token: str = "compressed", trust_remote_code: bool = False,
                 seed: int = 0, batch_size: int | str = 1, max_batch_size: int | None = None, **method_options):
        super().__init__()
        self.ratio = float(ratio)
        self.method, self.budget = make_method(str(method), self.ratio, allocation, int(seed), method_options)
        if first_token not in FIRST_TOKEN:
            raise ValueError(f"first_token must be one of {', '.join(FIRST_TOKEN)}, not {first_token!r}")
        self.first_token = first_token
        if str(batch_size) not in ("1", "auto") or max_batch_size not in (None, 1):
            _log(f"kvbench: batch size {batch_size} requested; kvbench runs requests one at a time (batch 1)")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI defaults --device to cuda:0; on a CPU-only machine fall back, as HFLM does
            _log(f"kvbench: device {device} requested but CUDA is not available; using the CPU")
            device = None
        self.loaded = load_model(str(pretrained), device, dtype, bool(trust_remote_code), log=_log)
        self.model, self.tokenizer, self._device = self.loaded.model, self.loaded.tokenizer, self.loaded.device
        self.method.setup(self.model, self.tokenizer)
        self.pretrained = str(pretrained)
        self.prefill_chunk = int(prefill_chunk)
        self._max_length = int(max_length) if max_length else None
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.eos_ids = engine.eos_ids(self.model, self.tokenizer)
        self.costs = DocumentCosts()
        self._pending = None  # the Instances of the loglikelihood call in flight
        attention.install(self.model)
        self.session = Session(self.model, self.prefill_chunk, self.eos_ids)

    # -- what TemplateLM needs ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(self.eos_ids)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the tokenizer has one, as HFLM does."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or getattr(self.model.config, "max_position_embeddings", None) or 2048

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM's rule: the tokenizer's own default unless ``add_bos_token`` says otherwise, and no
        second BOS when the string already starts with one (chat templates write it)."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
        extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **extra)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.tokenizer, chat_history, add_generation_prompt=add_generation_prompt,
                           continue_final_message=not add_generation_prompt)

    # -- the compressed prompt -----------------------------------------------------------------

    def _compress(self, ids: list[int]) -> tuple[Compressed, dict]:
        """The prompt ``ids`` prefilled, scored by the method and evicted down to ``ratio``.

        With ``first_token="compressed"`` (default) the prompt's last token is held back and run
        after eviction, so even a one-token answer (" B" of a multiple-choice question) is predicted
        from what the method kept; with ``"prefill"`` those logits come from the full prefill, as
        ``kvbench run --query-aware`` answers, and one-token answers cannot change.

        lm-eval hands over one formatted string, so the chat template's prefix is known only when the
        prompt starts with the one kvbench would write (``--apply_chat_template`` without a system
        instruction); it is then protected as in ``kvbench run``, otherwise only the sinks are.
        """
        held_back = 1 if self.first_token == "compressed" and len(ids) > 1 else 0
        context = torch.tensor([ids[: len(ids) - held_back]], device=self._device)
        layout = Layout(template_prefix_length(self.tokenizer, ids))
        compressed = self.session.compress(context, self.method, self.budget, layout=layout)
        stats = {
            "context_tokens": compressed.tokens,  # the tokens compressed
            "measured_ratio": compressed.eviction.measured_ratio,
            "kv_bytes_full": compressed.kv_bytes_full,
            "kv_bytes_kept": compressed.kv_bytes_kept,
            "kv_bytes_physical": compressed.kv_bytes_physical,
            "prefill_s": compressed.prefill_s,
            "scoring_s": compressed.scoring_s,
        }
        if held_back:
            self.session.extend(compressed, torch.tensor([ids[-1:]], device=self._device))
        return compressed, stats

    # -- loglikelihood ---------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._pending = list(requests)  # TemplateLM keeps their order; _loglikelihood_tokens reads them
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._pending = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Score each continuation against its compressed prompt; prompts shared by several
        requests (the choices of one question) are prefilled and compressed once."""
        instances = self._pending if self._pending and len(self._pending) == len(requests) else [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, (_, context_enc, _) in enumerate(requests):
            groups[tuple(context_enc)].append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="kvbench loglikelihood")
        for context_enc, members in groups.items():
            longest = max(len(requests[i][2]) for i in members)
            if longest > self.max_length:
                raise ValueError(f"a continuation of {longest} tokens exceeds max_length {self.max_length}")
            # like HFLM: what is fed (prompt + continuation but its last token) fits in max_length
            compressed, stats = self._compress(list(context_enc)[-(self.max_length + 1 - longest):])
            with engine.Timer(self._device) as decode_timer:
                for i in members:
                    (pair, _, continuation) = requests[i]
                    results[i] = self.session.continuation_logprob(compressed, continuation)
                    self.cache_hook.add_partial("loglikelihood", pair, results[i])
                    bar.update(1)
            peak, peak_kind = self.session.peak(max(compressed.peak_bytes, compressed.cache.peak_bytes))
            stats.update(decode_s=decode_timer.seconds, peak_mem_bytes=peak, peak_mem_kind=peak_kind)
            documents = {(instances[i].task_name, instances[i].doc_id): instances[i] for i in members
                         if instances[i] is not None}
            for instance in documents.values():  # once per document of this prompt
                self.costs.record(instance, stats)
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "kvbench does not support loglikelihood_rolling (perplexity tasks such as wikitext): it scores "
            "every token of a document, so there is no prompt to compress before scoring, and kvbench's lm-eval "
            "model evicts only once, after the prompt's prefill. Use loglikelihood or generate_until tasks."
        )

    # -- generate_until --------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="kvbench generate_until"):
            context, gen_kwargs = request.args
            text = self._generate(request, context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate(self, instance, context: str, gen_kwargs: dict) -> str:
        if gen_kwargs.get("do_sample"):
            raise NotImplementedError(
                "kvbench decodes greedily; this task asks for sampling (do_sample=True). "
                "Override it with --gen_kwargs do_sample=False,temperature=0."
            )
        until = gen_kwargs.get("until") or []
        stops = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        ids = self.tok_encode(context)[-max(1, self.max_length - max_new):] or [self.prefix_token_id]
        compressed, stats = self._compress(ids)
        answer = self.session.answer(compressed, None, max_new, stop=stops, decode=self.tok_decode)
        text = self.tok_decode(answer.tokens)
        for stop in stops:  # lm-eval's own rule: cut at each stop string in turn
            if stop:
                text = text.split(stop)[0]
        peak, peak_kind = self.session.peak(answer.peak_bytes)
        stats.update(decode_s=answer.seconds, new_tokens=len(answer.tokens), peak_mem_bytes=peak,
                     peak_mem_kind=peak_kind)
        self.costs.record(instance, stats)
        return text

    # -- what lm-eval stores with the results ----------------------------------------------------

    def get_model_info(self) -> dict:
        """Stored by lm-eval under ``config`` in the results JSON; ``kvbench import-lm-eval`` reads it."""
        return {
            "kvbench": {
                "pretrained": self.pretrained,
                "method": self.method.name,
                "method_spec": self.method.spec(),
                "method_config": self.method.config(),
                "allocation": getattr(self.method, "allocation", "uniform"),
                "target_ratio": self.ratio,
                "query_aware": True,
                "first_token": self.first_token,
                "prefill_chunk": self.prefill_chunk,
                "device": torch.cuda.get_device_name(self._device) if self._device.type == "cuda" else "cpu",
                "dtype": str(self.loaded.dtype).removeprefix("torch."),
                "kvbench_version": kvbench.__version__,
                "torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
                "git_sha": git_sha(),
                "per_doc": self.costs.per_doc(),
            }
        }
