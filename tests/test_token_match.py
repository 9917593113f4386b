"""token_match: hand-worked cases, and a case built so the answer needs an early context token."""

from __future__ import annotations

import pytest

from kvbench.models import load_model
from kvbench.run.config import RunConfig, plan
from kvbench.run.runner import Runner, token_match
from kvbench.core.task import Question, Sample
from tiny_models import save_tiny, tiny_tokenizer


@pytest.mark.parametrize(
    "candidate, reference, expected",
    [
        ([5, 6, 7], [5, 6, 7], (1.0, None)),
        ([], [], (1.0, None)),
        ([5, 9, 7], [5, 6, 7], (2 / 3, 1)),  # a miss in the middle; later agreement still counts
        ([5, 6], [5, 6, 7, 8], (2 / 4, 2)),  # stopped early: the missing tokens are misses
        ([5, 6, 7, 8], [5, 6], (2 / 4, 2)),  # ran on: the extra tokens are misses too
        ([1, 2, 3], [4], (0.0, 0)),
        ([], [4, 5], (0.0, 0)),
    ],
)
def test_hand_worked_cases(candidate, reference, expected):
    assert token_match(candidate, reference) == expected


CODES = ["magic", "special"]  # one token each: the two contexts differ in that early token only
FILLER = " ".join(["The grass is green. The sky is blue. The sun is yellow."] * 8)


def test_full_is_exact_window_loses_the_early_code_kvdirect_recomputes_it(tmp_path):
    model_dir = save_tiny(tmp_path / "tiny", "llama")
    tokenizer = tiny_tokenizer()
    contexts = [f"Remember this well, the secret code is {code}. {FILLER}" for code in CODES]
    ids = [tokenizer.encode(c) for c in contexts]
    differ = [i for i, (a, b) in enumerate(zip(*ids)) if a != b]
    window_keeps = len(ids[0]) - round(0.9 * len(ids[0]))  # 4 sinks and the newest of those
    assert len(differ) == 1 and 4 <= differ[0] < len(ids[0]) - window_keeps  # window at 0.9 drops it

    config = RunConfig(methods=["window", "kvdirect"], ratios=[0.9], model=str(model_dir), dtype="float32",
                       out=tmp_path / "results")
    loaded = load_model(config.model, "cpu", "float32", log=lambda *_: None)
    runner = Runner(config, loaded, plan(config))
    rows = {}
    for code, context in zip(CODES, contexts):
        sample = Sample(code, "codes", context, [Question("q", " What is the secret code?", [code])],
                        metric="string_match_all", max_new_tokens=12, chat_template=False)
        rows[code] = {r["method"]: r for r in runner.run_sample(sample, "test")}
    # the answer depends on the early token: the two full-cache answers differ
    assert rows["magic"]["full"]["prediction"] != rows["special"]["full"]["prediction"]
    for by_method in rows.values():
        assert by_method["full"]["token_match"] == 1.0 and by_method["full"]["first_divergence"] is None
        assert by_method["window"]["token_match"] < 1.0
        assert by_method["window"]["first_divergence"] is not None
        assert by_method["kvdirect"]["token_match"] == 1.0
        assert by_method["kvdirect"]["prediction"] == by_method["full"]["prediction"]
