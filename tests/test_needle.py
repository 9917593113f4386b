"""The needle task (RULER's single-needle NIAH at controlled depths) and its depth × length map.

The needle's place is checked in the tokenizer's own offsets, not by the generator's arithmetic;
the pivot, the Markdown report and the app's selectboxes against scores worked out by hand from
rows written here. The browser test (the HTML report and the app in Chromium) is in
tests/test_needle_browser.py.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvbench.cli import main
from kvbench.leaderboard_app import data
from kvbench.plugins import get_task, list_tasks
from kvbench.results import COLUMNS, ResultsWriter, read_results
from kvbench.results.table import depth_cells, depth_matrix
from kvbench.tasks.ruler import DEPTH_STEPS
from test_ruler import bpe, total_tokens, words  # noqa: F401 — the trained tokenizers are fixtures
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "leaderboard_app" / "app.py"
NEEDLE = re.compile(r"One of the special magic (?:numbers|uuids) for \S+ is: [\w-]+\.")
HEAD_END = "afterwards.\n"  # RULER's niah instruction ends the head; the haystack follows


@pytest.fixture(scope="module")
def task():
    return get_task("needle")


# --- the task --------------------------------------------------------------------------------------


def test_registered_beside_ruler(task):
    assert "needle" in list_tasks() and "ruler" in list_tasks()
    assert task.subtasks() == ["niah_single_1", "niah_single_2", "niah_single_3"]
    assert "needle" not in get_task("ruler").subtasks()  # `--task ruler` stays RULER's 13
    assert DEPTH_STEPS == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def needle_place(tokenizer, sample) -> tuple[float, int, int]:
    """(depth in percent of the haystack's tokens before the needle, needle's first token, haystack tokens),
    from the tokenizer's offsets of the whole context."""
    head = sample.context.index(HEAD_END) + len(HEAD_END)
    found = NEEDLE.search(sample.context, head)
    assert found and len(NEEDLE.findall(sample.context)) == 1, sample.sample_id
    offsets = tokenizer(sample.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    before = [i for i, (_, end) in enumerate(offsets) if end <= found.start()]
    inside = [i for i, (start, end) in enumerate(offsets) if start < found.end() and end > found.start()]
    head_tokens = sum(1 for _, end in offsets if end <= head)
    haystack = len(offsets) - head_tokens - len(inside)
    first = len(before)
    return 100 * (first - head_tokens) / haystack, first, haystack


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("tok_name", ["bpe", "words"])
@pytest.mark.parametrize("subtask", ["niah_single_1", "niah_single_2", "niah_single_3"])
def test_the_needle_sits_at_its_depth(task, request, tok_name, length, subtask):
    tokenizer = request.getfixturevalue(tok_name)
    samples = list(task.samples([subtask], 12, tokenizer, length, seed=3))
    places = []
    for index, sample in enumerate(samples):
        depth = DEPTH_STEPS[index % 11]
        assert sample.needle_depth == depth and sample.sample_id.endswith(f"-{index}-d{depth}")
        assert 0.98 * length <= total_tokens(tokenizer, sample) <= length, sample.sample_id
        share, first, _ = needle_place(tokenizer, sample)
        # a sentence or noise line is the grain: within 3 points of the haystack's tokens
        assert abs(share - depth) <= 3.0, (sample.sample_id, share)
        places.append(first)
        if depth == 0:  # straight after the instruction
            assert share == 0.0
        if depth == 100:  # the last thing before the question
            assert NEEDLE.search(sample.context).end() == len(sample.context)
    assert places[:11] == sorted(places[:11]) and places[11] == places[0]  # 11: depth 0 again, next needle


@pytest.mark.real_model
def test_depths_with_the_default_model_tokenizer(task):
    tokenizer = pytest.importorskip("kvbench.models").load_model("smollm2-135m").tokenizer
    for subtask in task.subtasks():
        for index, sample in enumerate(task.samples([subtask], 11, tokenizer, 1024, seed=0)):
            assert abs(needle_place(tokenizer, sample)[0] - DEPTH_STEPS[index]) <= 3.0, sample.sample_id
            assert 0.98 * 1024 <= total_tokens(tokenizer, sample) <= 1024, sample.sample_id


def test_one_needle_per_round_and_rulers_prompt(task, bpe):  # noqa: F811
    samples = list(task.samples(["niah_single_2"], 12, bpe, 1024, seed=0))
    refs = [s.questions[0].references for s in samples]
    assert all(r == refs[0] for r in refs[:11]) and refs[11] != refs[0]  # only the place changes in a round
    ruler = get_task("ruler").sample("niah_single_2", 0, bpe, 1024, 0)
    for sample in (samples[0], samples[5]):
        q, rq = sample.questions[0], ruler.questions[0]
        key = re.search(r"for (\S+) is: " + q.references[0], sample.context).group(1)
        assert sample.context.split("\n")[0] == ruler.context.split("\n")[0]  # RULER's instruction
        assert q.text == rq.text.replace(re.search(r"for (\S+) mentioned", rq.text).group(1), key)
        assert q.answer_prefix == rq.answer_prefix.replace(re.search(r"for (\S+) mentioned", rq.text).group(1), key)
        assert (sample.metric, sample.max_new_tokens) == (ruler.metric, ruler.max_new_tokens)
        assert (sample.metric, sample.max_new_tokens) == ("string_match_all", 128)
        assert re.fullmatch(r"\d{7}", q.references[0])


def test_deterministic_and_seeded(task, bpe):  # noqa: F811
    a = list(task.samples(["niah_single_1", "niah_single_3"], 3, bpe, 1024, seed=5))
    assert a == list(task.samples(["niah_single_1", "niah_single_3"], 3, bpe, 1024, seed=5))
    assert task.sample("niah_single_3", 2, bpe, 1024, 5) == a[5]  # a sample does not depend on the others
    other = list(task.samples(["niah_single_1", "niah_single_3"], 3, bpe, 1024, seed=6))
    assert all(x.questions[0].references != y.questions[0].references for x, y in zip(a, other))
    with pytest.raises(ValueError, match="unknown needle subtask"):
        task.samples(["vt"], 1, bpe, 1024, seed=0)
    with pytest.raises(ValueError, match="too short for needle:niah_single_1"):
        task.sample("niah_single_1", 0, bpe, 100, 0)


def test_rows_carry_the_depth(tmp_path, capsys):
    """`kvbench run --task needle` on a tiny model: every row's needle_depth is its sample's."""
    model = save_tiny(tmp_path / "tiny", "llama", max_position_embeddings=2048)
    out = tmp_path / "results"
    assert main(["run", "--model", str(model), "--method", "snapkv", "--ratio", "0.5", "--task",
                 "needle:niah_single_1", "--length", "512", "--samples", "11", "--out", str(out)]) == 0
    capsys.readouterr()
    frame = read_results(out)
    assert len(frame) == 22 and set(frame["method"]) == {"full", "snapkv"}
    suffix = frame["sample_id"].str.extract(r"-d(\d+)$")[0].astype(float)
    assert (frame["needle_depth"] == suffix).all()
    assert sorted(frame["needle_depth"].unique()) == DEPTH_STEPS


# --- the pivot ---------------------------------------------------------------------------------------

LENGTHS = [1024, 2048]
CELLS = [("full", 0.0), ("snapkv", 0.5), ("snapkv", 0.75), ("kvzap", None)]


def found(variant: str, ratio: float | None, subtask: str, length: int, depth: int, question: int) -> float:
    """A made-up score: compressed caches lose needles deep in long contexts, one subtask more than the other."""
    if variant == "full":
        return 100.0
    reach = {0.5: 60, 0.75: 30, None: 50}[ratio] - (20 if length == 2048 else 0) - (10 if subtask == "b" else 0)
    return 100.0 if depth <= reach or question == 1 else 0.0


def needle_rows(depths=(0, 50, 100)) -> list[dict]:
    """Rows as a needle sweep writes them: subtask a with two samples per depth (the second asked twice),
    subtask b with one; snapkv @ 0.75 fails at depth 100, length 2048; one RULER row without a depth."""
    rows = []
    for variant, ratio in CELLS:
        config = {"threshold": -4.0} if variant == "kvzap" else {"window_size": 64}
        for length in LENGTHS:
            for subtask, samples in (("a", 2), ("b", 1)):
                for depth in depths:
                    for s in range(samples):
                        sample_id = f"{subtask}-{length}-0-{s}-d{depth}"
                        for q in range(1 + (subtask == "a" and s == 1)):
                            failed = (variant, ratio, length, depth) == ("snapkv", 0.75, 2048, 100)
                            rows.append({
                                "model": "m", "task": "needle", "subtask": subtask, "requested_length": length,
                                "query_aware": False, "sample_id": sample_id, "question_id": f"{sample_id}-q{q}",
                                "method": variant, "method_config": json.dumps(config), "target_ratio": ratio,
                                "needle_depth": float(depth), "context_tokens": length - 130,
                                "kv_bytes_full": 1000, "kv_bytes_kept": 500, "kv_bytes_physical": 500,
                                "prefill_s": 0.1, "decode_s": 0.1, "measured_ratio": ratio or 0.0,
                                "metric": "string_match_all", "error": "RuntimeError: boom" if failed else None,
                                "score": None if failed else found(variant, ratio, subtask, length, depth, q),
                            })
    rows.append({**rows[0], "task": "ruler", "subtask": "vt", "needle_depth": None, "score": 0.0})
    return rows


def expected_cell(variant, ratio, length, depth) -> float:
    """By hand: a's two samples (the second the mean of its two questions), averaged; then with b."""
    if (variant, ratio, length, depth) == ("snapkv", 0.75, 2048, 100):
        return float("nan")
    a0 = found(variant, ratio, "a", length, depth, 0)
    a1 = (found(variant, ratio, "a", length, depth, 0) + found(variant, ratio, "a", length, depth, 1)) / 2
    return ((a0 + a1) / 2 + found(variant, ratio, "b", length, depth, 0)) / 2


def frame_of(rows) -> pd.DataFrame:
    return pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows])


def test_depth_matrix_against_hand_made_rows():
    frame = frame_of(needle_rows())
    assert depth_cells(frame) == [("full", 0.0), ("kvzap", None), ("snapkv", 0.5), ("snapkv", 0.75)]
    for variant, ratio in CELLS:
        matrix = depth_matrix(frame, variant, ratio)
        assert list(matrix.index) == [0.0, 50.0, 100.0] and list(matrix.columns) == LENGTHS
        expected = [[expected_cell(variant, ratio, n, d) for n in LENGTHS] for d in (0, 50, 100)]
        np.testing.assert_array_equal(matrix.to_numpy(), np.array(expected))
    # spot checks of the made-up scores, so the formula above cannot hide a mistake
    assert depth_matrix(frame, "snapkv", 0.5).loc[50.0, 1024] == 100.0
    # past the reach: a's first sample 0, its second (0 + 100) / 2 over two questions, b 0
    assert depth_matrix(frame, "snapkv", 0.5).loc[50.0, 2048] == ((0 + 50) / 2 + 0) / 2
    assert np.isnan(depth_matrix(frame, "snapkv", 0.75).loc[100.0, 2048])  # every row failed
    assert depth_matrix(frame, "nope", 0.5).empty


def test_old_files_without_the_column_load_with_no_depths(tmp_path):
    pd.DataFrame({"method": ["full"], "model": ["m"], "task": ["ruler"], "subtask": ["vt"], "sample_id": ["1"],
                  "target_ratio": [0.0], "score": [100.0]}).to_parquet(tmp_path / "old.parquet")
    loaded = data.load(tmp_path)
    assert not loaded.skipped and loaded.frame["needle_depth"].isna().all()
    assert depth_cells(loaded.frame) == []


def write_needle_results(folder: Path) -> Path:
    ResultsWriter(folder, "run-needle").add(needle_rows())
    return folder


def test_markdown_report_has_a_depth_table_per_length(tmp_path, capsys):
    results = write_needle_results(tmp_path / "results")
    assert main(["report", str(results), "--format", "md"]) == 0
    text = capsys.readouterr().out
    for length in LENGTHS:
        table = text.split(f"at {length} tokens", 1)[1].split("\n\n", 2)[1]
        lines = table.splitlines()
        assert lines[0] == "| method | ratio | 0% | 50% | 100% |"
        rows = {tuple(cell.strip() for cell in line.strip("|").split("|")[:2]): line for line in lines[2:]}
        for variant, ratio in CELLS:
            label = "threshold" if ratio is None else f"{ratio:g}"
            cells = [c.strip() for c in rows[(variant, label)].strip("|").split("|")[2:]]
            want = [expected_cell(variant, ratio, length, d) for d in (0, 50, 100)]
            assert cells == ["—" if np.isnan(w) else f"{w:.0f}" for w in want], (variant, ratio, length)


# --- the app (Streamlit's AppTest): the selectboxes choose the map ------------------------------------


def plotly_array(value) -> np.ndarray:
    """A figure's array as JSON holds it: a list, or plotly's typed array (dtype, base64 bytes, shape)."""
    if isinstance(value, dict):
        flat = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        return flat.reshape([int(n) for n in str(value.get("shape", len(flat))).split(",")]).astype(float)
    return np.array([[np.nan if v is None else v for v in row] for row in value], dtype=float)


def test_app_heatmap_follows_the_selectboxes(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    results = write_needle_results(tmp_path / "results")
    monkeypatch.setenv("KVBENCH_RESULTS", str(results))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception
    assert at.sidebar.selectbox[1].value == "needle"  # the first task by name

    def box(label: str):  # looked up again after every run: elements belong to one run's tree
        return next(s for s in at.selectbox if s.label == label)

    def shows(variant: str, ratio: float | None) -> None:
        maps = [s for s in (json.loads(c.proto.spec) for c in at.get("plotly_chart"))
                if "Needle" in s["layout"].get("title", {}).get("text", "")]
        assert len(maps) == 1
        trace, label = maps[0]["data"][0], "threshold" if ratio is None else f"{ratio:g}"
        assert maps[0]["layout"]["title"]["text"] == f"Needle in a haystack: {variant} @ {label}"
        assert trace["type"] == "heatmap" and trace["x"] == ["1024", "2048"] and trace["y"] == ["0%", "50%", "100%"]
        want = [[expected_cell(variant, ratio, n, d) for n in LENGTHS] for d in (0, 50, 100)]
        np.testing.assert_array_equal(plotly_array(trace["z"]), np.array(want))

    assert box("Method").options == ["full", "kvzap", "snapkv"] and box("Method").value == "kvzap"  # first evicting
    assert box("Ratio").options == ["threshold"]
    shows("kvzap", None)
    box("Method").set_value("snapkv").run()
    assert box("Ratio").options == ["0.5", "0.75"] and box("Ratio").value == 0.75  # its middle ratio
    shows("snapkv", 0.75)
    box("Ratio").select_index(0).run()
    shows("snapkv", 0.5)
    box("Method").set_value("full").run()
    shows("full", 0.0)
