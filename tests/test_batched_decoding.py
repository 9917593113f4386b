"""Batched decoding of a context's cells (``--decode-batch``) gives every cell the answer it gets alone.

The reference is the unbatched path, ``Session.answer`` one cell at a time at batch size 1, with the
packed layout's own attention; the batch stacks the cells' caches in the padded layout with a
validity mask, so the two compute each answer differently. float32, tiny models (GQA).
"""

from __future__ import annotations

import pytest
import torch
from test_gated import published_states
from tiny_models import save_tiny, tiny_model, tiny_tokenizer

from kvbench.core import attention, batch
from kvbench.core.budget import Budget
from kvbench.core.session import Session
from kvbench.core.task import Question, Sample
from kvbench.models import load_model
from kvbench.plugins import get_method
from kvbench.run.config import RunConfig, plan
from kvbench.run.runner import Runner

CONTEXT = "One of the special magic numbers for the key is: 1234567. The grass is green. The sky is blue. " * 3
QUESTION = " What is the special magic number?"
RATIOS = (0.3, 0.6, 0.9)


def gates(tmp_path, layers):
    path = tmp_path / "q2_dim16_sink16.pt"
    torch.save({"module": published_states(layers)}, path)
    return path


def methods(tmp_path, layers=2):
    """Uniform and per-head (global allocation: heads keep unequal counts) methods; ``gated`` with
    random gates for ``layers`` layers."""
    return [get_method("window"), get_method("snapkv"), get_method("random"),
            get_method("snapkv", allocation="global"), get_method("gated", weights=str(gates(tmp_path, layers)))]


def cells(session, ids, chosen):
    prefill = session.prefill(ids, chosen)
    out = [session.full(prefill, get_method("full"))]
    for method in chosen:
        scored = session.score(prefill, method, Budget(RATIOS[0], method.allocation))
        out += [session.cut(prefill, scored, Budget(r, method.allocation)) for r in RATIOS]
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])  # gemma3: sliding-window layers stacked too
def test_a_batch_of_cells_answers_as_each_cell_alone(arch, tmp_path):
    model = tiny_model(arch)
    attention.install(model)
    tokenizer = tiny_tokenizer()
    session = Session(model, prefill_chunk=16, eos_ids={2})
    ids = torch.tensor([tokenizer.encode(CONTEXT)])
    made = cells(session, ids, methods(tmp_path, model.config.num_hidden_layers))
    ragged = [c for c in made if any(layer.valid is not None for layer in c.cache.layers)]
    assert ragged, "no cell whose heads keep unequal counts: the padded mask would go untested"
    question = tokenizer.encode(QUESTION)

    def decode(tokens):
        return tokenizer.decode(tokens)

    for stop in ([], ["e"]):
        alone = [session.answer(c, question, 24, stop=stop, decode=decode) for c in made]
        together = session.answer_batch(made, question, 24, stop=stop, decode=decode)
        assert [a.tokens for a in together] == [a.tokens for a in alone]
        # each cell's cache is left as it was: answering it alone again gives the same tokens
        assert [session.answer(c, question, 24, stop=stop, decode=decode).tokens for c in made] == \
            [a.tokens for a in alone]
    lengths = {len(a.tokens) for a in together}
    unstopped = [session.answer(c, question, 24).tokens for c in made]
    assert len(lengths) > 1, "every row finished at the same length: dropping finished rows went untested"
    assert any(len(a.tokens) < len(u) for a, u in zip(together, unstopped)), "no row was cut by the stop string"
    held = sum({id(c.cache): c.cache.nbytes for c in made}.values())
    stacked = batch.stacked_bytes([c.cache for c in made], len(question) + 24)
    for answer, cell in zip(together, made):
        assert answer.seconds > 0
        assert answer.peak_bytes >= held + stacked >= cell.peak_bytes  # the whole batch is counted


def test_stacked_bytes_and_groups_follow_the_cap(tmp_path):
    model = tiny_model("llama")
    attention.install(model)
    session = Session(model, prefill_chunk=16, eos_ids={2})
    made = cells(session, torch.tensor([tiny_tokenizer().encode(CONTEXT)]), methods(tmp_path)[:2])
    caches = [c.cache for c in made]
    assert batch.stacked_bytes(caches, 5) == batch.stack(caches, 5).nbytes
    cap = batch.stacked_bytes(caches[:3], 5)
    groups = batch.groups(caches, 5, max_rows=4, max_bytes=cap)
    assert sorted(i for g in groups for i in g) == list(range(len(caches)))
    for group in groups:
        assert len(group) <= 4
        assert len(group) == 1 or batch.stacked_bytes([caches[i] for i in group], 5) <= cap
    assert batch.groups(caches, 5, max_rows=1, max_bytes=10**12) == [[i] for i in batch.groups(
        caches, 5, max_rows=len(caches), max_bytes=10**12)[0]]


COMPARED = ["method", "target_ratio", "question_id", "prediction", "new_tokens", "token_match", "first_divergence",
            "measured_ratio", "kv_bytes_full", "kv_bytes_kept", "kv_bytes_physical", "error"]


def run_rows(model_dir, tmp_path, decode_batch, **options):
    config = RunConfig(model=str(model_dir), dtype="float32", out=tmp_path / "unused", decode_batch=decode_batch,
                       **options)
    runner = Runner(config, load_model(config.model, "cpu", "float32", log=lambda *_: None), plan(config))
    questions = [Question("q0", QUESTION, ["1234567"]), Question("q1", " What color is the sky?", ["blue"])]
    sample = Sample("s", "test", CONTEXT, questions, metric="string_match_all", max_new_tokens=20,
                    chat_template=False, stop=["e"])
    return runner.run_sample(sample, "test")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_sweep_with_batched_decoding_records_the_rows_of_one_at_a_time(arch, tmp_path):
    model_dir = save_tiny(tmp_path / "tiny", arch)
    options = {"methods": ["window", "snapkv", "random", "snapkv:allocation=global", "kvdirect"],
               "ratios": [0.3, 0.9]}
    alone = run_rows(model_dir, tmp_path, 1, **options)
    together = run_rows(model_dir, tmp_path, 3, **options)  # 11 cells, batches of 3 (kvdirect alone)
    assert [{k: r.get(k) for k in COMPARED} for r in together] == [{k: r.get(k) for k in COMPARED} for r in alone]
    assert all(r.get("error") is None for r in together)
    assert len({r["new_tokens"] for r in together}) > 1
    assert {r["decode_batch"] for r in together} == {3}
    assert all(r["decode_s"] > 0 for r in together)


def test_query_aware_cells_batch_from_the_prefill_logits(tmp_path):
    """Query-aware: the question is compressed with the context, so the batch starts from the logits."""
    model_dir = save_tiny(tmp_path / "tiny", "qwen3")
    options = {"methods": ["snapkv", "snapkv:allocation=global", "window"], "ratios": [0.3, 0.9], "query_aware": True}
    alone = run_rows(model_dir, tmp_path, 1, **options)
    together = run_rows(model_dir, tmp_path, 8, **options)
    assert [{k: r.get(k) for k in COMPARED} for r in together] == [{k: r.get(k) for k in COMPARED} for r in alone]
    assert len(together) == 2 * 7 and all(r.get("error") is None for r in together)


def test_cells_that_evict_while_decoding_fall_back_to_one_at_a_time(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny", "llama")
    options = {"methods": ["h2o", "window"], "ratios": [0.5], "evict_during_decoding": True, "decode_interval": 4}
    alone = run_rows(model_dir, tmp_path, 1, **options)
    together = run_rows(model_dir, tmp_path, 4, **options)
    assert [{k: r.get(k) for k in COMPARED} for r in together] == [{k: r.get(k) for k in COMPARED} for r in alone]
    model = tiny_model("llama")
    attention.install(model)
    session = Session(model, prefill_chunk=16, eos_ids={2}, decode_interval=4)
    made = cells(session, torch.tensor([tiny_tokenizer().encode(CONTEXT)]), [get_method("h2o")])
    assert batch.batchable(made[0], True, 4) and not any(batch.batchable(c, True, 4) for c in made[1:])
    assert all(batch.batchable(c, False, 4) for c in made)
    kvdirect = session.compress(torch.tensor([tiny_tokenizer().encode(CONTEXT)]), get_method("kvdirect"),
                                Budget(0.5))
    assert not batch.batchable(kvdirect, False, None)


def test_a_batch_that_runs_out_of_memory_is_answered_one_cell_at_a_time(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "tiny", "llama")
    options = {"methods": ["window", "snapkv"], "ratios": [0.5]}
    alone = run_rows(model_dir, tmp_path, 1, **options)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Session, "answer_batch", out_of_memory)
    together = run_rows(model_dir, tmp_path, 4, **options)
    assert [{k: r.get(k) for k in COMPARED} for r in together] == [{k: r.get(k) for k in COMPARED} for r in alone]
