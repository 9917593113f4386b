"""Eviction during chunked prefill and during decoding: budgets held at every step; bad flags refused."""

from __future__ import annotations

import pytest
import torch

from kvbench.core import attention, engine
from kvbench.core.budget import kept_count
from kvbench.cli import main
from kvbench.plugins import get_method
from kvbench.results import read_results
from kvbench.core.budget import Budget
from kvbench.core.scoring import ScoreStream
from test_cli import tiny_dir  # noqa: F401  (module fixture: a saved tiny Llama)
from tiny_models import tiny_model

LAYERS, KV_HEADS = 2, 2


class RecordingEvictor(engine.Evictor):
    """Notes the cache's entries before and after every eviction."""

    def __init__(self, *args):
        super().__init__(*args)
        self.log: list[tuple[int, int, int]] = []  # (seen, entries before, entries after)

    def __call__(self, seen: int) -> None:
        before = self.cache.entries()
        super().__call__(seen)
        self.log.append((seen, before, self.cache.entries()))


@pytest.mark.parametrize("name", ["window", "random", "h2o"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_chunked_prefill_eviction_stays_within_budget_plus_one_chunk(name, allocation):
    model = tiny_model("llama")
    attention.install(model)
    context, chunk, ratio = torch.randint(3, 300, (1, 100)), 16, 0.5
    cache = engine.new_cache(model)
    method = get_method(name, allocation=allocation)
    stream = ScoreStream(engine.attention_modules(model), cache, [method] if name == "h2o" else [])
    evictor = RecordingEvictor(model, cache, method, Budget(ratio, allocation), stream)
    engine.prefill(model, cache, context, 0, chunk, evictor)
    stream.remove()
    per_token = LAYERS * KV_HEADS
    previous_budget = 0
    for seen, before, after in evictor.log:
        assert before <= previous_budget + chunk * per_token  # never more than the budget + one chunk
        assert after == kept_count(seen, ratio) * per_token  # evicted exactly down to the budget
        previous_budget = after
    assert [s for s, _, _ in evictor.log] == [16, 32, 48, 64, 80, 96, 100]
    full_bytes = 100 * per_token * 2 * 16 * 4  # fp32 keys and values, head_dim 16
    assert cache.peak_bytes < 0.7 * full_bytes  # the budget plus one chunk, not the whole context


@pytest.mark.parametrize("name", ["window", "h2o"])
def test_decode_eviction_holds_the_ratio_within_one_interval(name):
    model = tiny_model("qwen3")
    attention.install(model)
    model.generation_config.eos_token_id = None
    context, ratio, interval = torch.randint(3, 300, (1, 60)), 0.5, 8
    method = get_method(name)
    cache = engine.new_cache(model)
    stream = ScoreStream(engine.attention_modules(model), cache, [method] if name == "h2o" else [])
    first = engine.prefill(model, cache, context, 0, 64)
    evictor = RecordingEvictor(model, cache, method, Budget(ratio, method.allocation), stream)
    evictor(60)
    sizes = []

    def on_interval(seen):
        evictor(seen)
        sizes.append((seen, cache.entries()))

    tokens = engine.greedy(model, cache, first, 60, 40, eos_ids=set(), every=interval, on_interval=on_interval)
    stream.remove()
    assert len(tokens) == 40
    per_token = LAYERS * KV_HEADS
    assert [s for s, _ in sizes] == [68, 76, 84, 92]
    for seen, entries in sizes:
        assert entries == kept_count(seen, ratio) * per_token
    # between evictions the cache grows by at most one interval
    assert cache.entries() <= kept_count(92, ratio) * per_token + interval * per_token


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "snapkv", "--allocation", "diagonal"], "unknown allocation 'diagonal'"),
        (["--method", "window", "--evict-during-decoding", "--decode-interval", "0"], "--decode-interval must be"),
        (["--method", "snapkv", "--evict-during-prefill"], "snapkv cannot evict during prefill"),
        (["--method", "snapkv", "--evict-during-decoding"], "snapkv cannot evict during decoding"),
    ],
)
def test_bad_eviction_options_are_refused(args, message, tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code = main(["run", *args, "--ratio", "0.5", "--model", str(tiny_dir), "--task", "ruler:niah_single_1",
                 "--length", "512", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_run_with_global_allocation_and_eviction_moments_records_them(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert main(["run", "--method", "h2o", "--ratio", "0.6", "--allocation", "global", "--evict-during-prefill",
                 "--evict-during-decoding", "--decode-interval", "16", "--prefill-chunk", "32",
                 "--model", str(tiny_dir), "--task", "ruler:niah_single_1", "--length", "512",
                 "--samples", "1", "--out", str(out)]) == 0
    frame = read_results(out)
    h2o = frame[frame["method"] == "h2o"].iloc[0]
    assert h2o["allocation"] == "global" and h2o["evict_during_prefill"] and h2o["decode_interval"] == 16
    assert abs(h2o["measured_ratio"] - 0.6) < 0.01
    full = frame[frame["method"] == "full"].iloc[0]
    # eviction during prefill bounds the peak: well below the full cache's high-water mark
    assert h2o["peak_mem_bytes"] < 0.7 * full["peak_mem_bytes"]
    # padding, masks and method state count in the physical bytes, never below the kept bytes
    assert h2o["kv_bytes_physical"] >= h2o["kv_bytes_kept"]
