"""The kvbench leaderboard: ``kvbench leaderboard [--results DIR]``, or
``streamlit run leaderboard_app/app.py -- --results DIR`` (``KVBENCH_RESULTS=DIR`` works too).

This script only lays out widgets and charts; every number comes from ``kvbench.leaderboard_app.data``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from kvbench.leaderboard_app import charts, data  # noqa: E402

QUERY_MODES = {False: "query-agnostic", True: "query-aware"}


def results_folder() -> Path:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--results")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.results or os.environ.get("KVBENCH_RESULTS") or "results")


@st.cache_data(show_spinner="Reading results…", max_entries=8)
def load(folder: str, signature: tuple) -> data.Loaded:
    """Cached on the folder and its files' names, sizes and times: new part files are picked up."""
    return data.load(Path(folder))


@st.cache_data(show_spinner="Aggregating…", max_entries=64)
def aggregate(folder: str, signature: tuple, filters: tuple) -> tuple[pd.DataFrame, pd.DataFrame]:
    selected = data.select(load(folder, signature).frame, data.Filters(*filters))
    return selected, data.leaderboard(selected)


def shown(folder: Path) -> str:
    """The folder relative to where the leaderboard was started, when it is under it: the page (and
    any screenshot of it) then names the folder as the user typed it, not a path of this machine."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def no_results(folder: Path) -> None:
    where = "does not exist" if not folder.exists() else "has no results yet"
    st.info(f"The results folder `{folder}` {where}.", icon="ℹ️")
    st.markdown(
        "The leaderboard renders the parquet part files that `kvbench run` writes, one row per "
        "(sample, question, method, ratio). Produce some, for example a small RULER sweep of SnapKV on "
        "the default model (CPU is fine), each run adding the `full` baseline it is compared with:"
    )
    st.code(
        "for ratio in 0.25 0.5 0.75; do\n"
        f"  kvbench run --method snapkv --ratio $ratio --out {shlex.quote(str(folder))}\n"
        "done\n"
        "kvbench list methods   # the other methods to sweep",
        language="bash",
    )
    st.markdown(
        "then reload this page. To show another folder: `kvbench leaderboard --results DIR`."
    )


def sidebar_filters(frame: pd.DataFrame) -> tuple | None:
    """The sidebar widgets; returns the fields of :class:`data.Filters`, or None when nothing is chosen."""
    side = st.sidebar
    side.header("Filters")
    models = frame["model"].value_counts().index.tolist()
    model = side.selectbox("Model", models, help="One model at a time: scores of different models do not pool.")
    rows = frame[frame["model"] == model]
    task = side.selectbox("Task", sorted(rows["task"].dropna().unique()))
    rows = rows[rows["task"] == task]

    all_subtasks = sorted(rows["subtask"].dropna().unique())
    subtasks = side.multiselect("Subtasks", all_subtasks, default=all_subtasks)
    all_lengths = sorted(int(v) for v in rows["requested_length"].dropna().unique())
    lengths = all_lengths
    if all_lengths:
        lengths = side.multiselect("Context length (requested tokens)", all_lengths, default=all_lengths)
    modes = sorted(bool(v) for v in rows["query_aware"].unique())
    query_aware = side.radio(
        "Question", modes, format_func=QUERY_MODES.get,
        help="query-agnostic: the context is compressed before the question is seen (the default); "
             "query-aware: the question is compressed with it.",
    )
    all_methods = sorted(m for m in rows["method"].dropna().unique() if m != data.BASELINE)
    methods = side.multiselect("Methods", all_methods, default=all_methods,
                               help=f"The `{data.BASELINE}` baseline is always shown.")
    if not subtasks or (all_lengths and not lengths):
        return None
    return (
        model, task,
        None if subtasks == all_subtasks else tuple(subtasks),
        None if lengths == all_lengths else tuple(lengths),
        bool(query_aware),
        None if methods == all_methods else tuple(methods),
    )


def leaderboard_table(board: pd.DataFrame, selected: pd.DataFrame) -> None:
    number = st.column_config.NumberColumn
    st.dataframe(
        data.display_table(board), hide_index=True, height=min(35 * (len(board) + 1) + 3, 800),
        column_config={
            "method": st.column_config.TextColumn(pinned=True),
            "ratio": number(format="%.2f", help="requested fraction of the context's KV entries evicted"),
            "memory saved": number(format="percent", help="1 − physical KV bytes / the full cache's; below 0: "
                                   "the method holds more bytes than the full cache"),
            "score": number(format="%.1f", help="macro mean over subtasks of each subtask's mean over samples "
                            "(a sample: the mean over its questions), 0–100; empty when a subtask has no valid sample"),
            "95% CI low": number(format="%.1f", help="percentile bootstrap over samples, stratified by subtask, "
                                 "1,000 resamples, seeded"),
            "samples": number(help="samples behind the score (all subtasks)"),
            "95% CI high": number(format="%.1f"),
            "gap to full": number(format="%+.1f", help="score − the full-cache score on this selection"),
            "measured ratio": number(format="%.3f", help="entries removed / entries before, all layers and KV heads"),
            "token match": number(format="%.3f", help="fraction of greedy tokens equal to the full cache's answer"),
            "KV kept (MiB)": number(format="%.2f", help="logical bytes of the KV entries kept"),
            "KV physical (MiB)": number(format="%.2f", help="bytes the cache really holds (padding included)"),
            "peak mem (MiB)": number(format="%.1f", help=peak_help(selected)),
            "prefill+scoring (s)": number(format="%.3f"),
            "decode (s)": number(format="%.3f", help="time to answer one question"),
            "errors": number(help="rows that failed: left out of the score, listed under Run details"),
        },
    )
    for note in data.notes(board):
        (st.warning if note.startswith("Saves no memory") else st.info)(note)
    failed = board[board["errors"] > 0]
    if len(failed):
        st.warning("Cells with failed rows (their score is over the valid samples only): " + ", ".join(
            f"{v} @ {charts.ratio_label(r)} ({e} rows)" for v, r, e in
            zip(failed["variant"], failed["target_ratio"], failed["errors"])))
    left, right, _ = st.columns([1, 1, 3])
    left.download_button("Download table (CSV)", board.to_csv(index=False), file_name="kvbench-leaderboard.csv",
                         mime="text/csv", help="the table above with raw bytes and the commands that made each row")
    right.download_button("Download rows (CSV)", selected.to_csv(index=False), file_name="kvbench-rows.csv",
                          mime="text/csv", help="every parquet row behind the table")


def peak_help(selected: pd.DataFrame) -> str:
    kinds = ", ".join(sorted(selected["peak_mem_kind"].dropna().unique())) or "unrecorded"
    return f"peak memory while answering ({kinds}: kv_cache = the cache's own high-water mark on CPU, " \
           "cuda_max_allocated = every CUDA allocation, weights included)"


def per_subtask(selected: pd.DataFrame, board: pd.DataFrame) -> None:
    ratios = sorted(r for r in board.loc[board["method"] != data.BASELINE, "target_ratio"].dropna().unique())
    if not ratios:
        st.info("No evicting method with a target ratio in this selection.")
        return
    ratio = ratios[0] if len(ratios) == 1 else st.select_slider(
        "Ratio", options=ratios, value=ratios[len(ratios) // 2], format_func=lambda r: f"{r:g}")
    st.plotly_chart(charts.heatmap(data.subtask_matrix(selected, ratio), ratio))
    st.markdown("**Every subtask's score** (the leaderboard's score is their macro mean)")
    table = data.per_subtask(selected)
    st.dataframe(table.drop(columns="method").rename(columns={"variant": "method", "target_ratio": "ratio"}),
                 hide_index=True)


def needle_map(selected: pd.DataFrame) -> None:
    """Score over needle depth × context length for one chosen method and ratio (needle-task rows only)."""
    cells = data.depth_cells(selected)
    variants = list(dict.fromkeys(v for v, _ in cells))
    left, right, _ = st.columns([2, 1, 3])
    default = next((i for i, v in enumerate(variants) if v != data.BASELINE), 0)
    variant = left.selectbox("Method", variants, index=default)
    ratios = [r for v, r in cells if v == variant]
    # no key: another method's ratios make a new widget, starting at its middle ratio
    ratio = right.selectbox("Ratio", ratios, index=len(ratios) // 2, format_func=charts.ratio_label)
    st.plotly_chart(charts.depth_heatmap(data.depth_matrix(selected, variant, ratio), variant, ratio))
    st.caption("Each cell: the score of the samples whose needle sits at that depth of the haystack, at that "
               "requested context length (mean over samples per subtask, then over subtasks).")


def costs(board: pd.DataFrame, selected: pd.DataFrame) -> None:
    measures = {
        "peak memory": "peak_mem_bytes",
        "KV physical bytes": "kv_bytes_physical",
        "KV kept bytes": "kv_bytes_kept",
    }
    measure = st.radio("Memory measure", list(measures), horizontal=True, help=peak_help(selected))
    left, right = st.columns(2)
    left.plotly_chart(charts.pareto(board, measures[measure], f"{measure} (MiB)",
                                    f"Score against {measure}", scale=data.MIB))
    right.plotly_chart(charts.pareto(board, "prefill_scoring_s", "prefill + scoring time (s)",
                                     "Score against prefill + scoring time"))


def run_details(board: pd.DataFrame, selected: pd.DataFrame) -> None:
    st.markdown("**Runs behind this selection**")
    st.dataframe(data.runs(selected), hide_index=True)
    labels = [f"{v} @ {charts.ratio_label(r)}" for v, r in zip(board["variant"], board["target_ratio"])]
    choice = st.selectbox("Reproduce a leaderboard row", range(len(board)), format_func=labels.__getitem__)
    commands = board["commands"].iloc[choice] if len(board) else ""
    st.code(commands or "# no command recorded for this row", language="bash")
    failed = data.errors(selected)
    if len(failed):
        st.markdown(f"**{len(failed)} failed rows** (left out of the scores)")
        st.dataframe(failed, hide_index=True)


def main() -> None:
    st.set_page_config(page_title="kvbench leaderboard", page_icon="📉", layout="wide")
    st.title("kvbench leaderboard")
    folder = results_folder()
    signature = data.signature(folder)
    loaded = load(str(folder), signature)
    if loaded.skipped:
        st.warning(
            f"Skipped {len(loaded.skipped)} file(s) that are not readable kvbench results:\n\n"
            + "\n".join(f"- `{name}`: {why}" for name, why in loaded.skipped)
        )
    frame = loaded.frame
    if frame.empty:
        no_results(folder)
        return

    filters = sidebar_filters(frame)
    if filters is None:
        st.info("Choose at least one subtask and one context length in the sidebar.")
        return
    selected, board = aggregate(str(folder), signature, filters)
    if board.empty:
        st.info("No rows match these filters.")
        return
    samples = selected.drop_duplicates(data.SAMPLE_KEY)
    mode = QUERY_MODES[filters[4]]
    if not selected.loc[selected["method"] == data.BASELINE, "query_aware"].eq(filters[4]).all():
        mode += f" (the `{data.BASELINE}` baseline comes from the other mode: it evicts nothing)"
    st.caption(
        f"**{filters[0]}** · {filters[1]} · {len(samples)} samples, {len(selected)} rows · {mode} · "
        f"`{shown(folder)}`: {len(loaded.files)} part file(s)"
    )
    if data.BASELINE not in set(board["method"]):
        st.warning(f"No `{data.BASELINE}` baseline in this selection: the gap to full is left empty.")

    st.subheader("Leaderboard")
    leaderboard_table(board, selected)
    st.plotly_chart(charts.score_vs_memory(board))
    if selected["needle_depth"].notna().any():
        st.subheader("Needle depth × context length")
        needle_map(selected)

    evicted, per_sub, cost, fid, details = st.tabs(
        ["Entries evicted", "Per subtask", "Memory & time", "Fidelity", "Run details"])
    with evicted:
        st.plotly_chart(charts.score_vs_ratio(board))
    with per_sub:
        per_subtask(selected, board)
    with cost:
        costs(board, selected)
    with fid:
        st.plotly_chart(charts.fidelity(board))
    with details:
        run_details(board, selected)


main()
