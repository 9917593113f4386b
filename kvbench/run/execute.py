"""``kvbench run`` and ``kvbench sweep``: plan, load the model once, run this shard's samples, write rows."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvbench.errors import UsageError
from kvbench.models import load_model
from kvbench.results import ResultsWriter, read_part, remove_temporaries, row_key
from kvbench.results.io import empty_frame
from kvbench.results.summary import cells, errors_line, render, where_line
from kvbench.run.config import Plan, RunConfig, plan
from kvbench.run.runner import Runner
from kvbench.run.sweep import FolderLock, other_dtypes, resume_keys


@dataclass
class Outcome:
    """What a run wrote: the part file (None when every row was already there) and its rows."""

    path: Path | None
    rows: pd.DataFrame


def run(config: RunConfig, log=print) -> Path | None:
    """Run, then log the summary table and where the rows went; returns the part file."""
    outcome = execute(config, log=log)
    if outcome.path is not None:
        log("\n" + render(cells(outcome.rows)))
        failed = errors_line(outcome.rows)
        if failed:
            log(failed)
        log(where_line(len(outcome.rows), config.out, [outcome.path]))
    return outcome.path


def execute(config: RunConfig, log=print, progress: bool | None = None) -> Outcome:
    """Validate, load the model once, run this shard's samples, write parquet.

    ``progress``: a bar with the time left on stderr (None: only when stderr is a terminal); every
    sample also logs a line with its scores and the estimated time left, for logs without a bar.
    A resuming sweep holds its shard's lock on the folder throughout.
    """
    work = plan(config)
    if not config.resume:
        return _run(config, work, log, progress)
    with FolderLock(config.out, config.shard, config.command, log) as lock:
        if not lock.others:  # no other shard writing: what a killed run left is garbage
            remove_temporaries(config.out, log)
        return _run(config, work, log, progress)


def _run(config: RunConfig, work: Plan, log, progress: bool | None) -> Outcome:
    loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code, log=log)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions and config.length > max_positions:
        raise UsageError(f"--length {config.length} exceeds what {config.model} can hold ({max_positions} positions)")
    for method in work.methods:  # loads learned weights: missing ones are a one-line error, before any row
        method.setup(loaded.model, loaded.tokenizer)
    runner = Runner(config, loaded, work)
    per_subtask = []
    for sub in work.subtasks:
        try:
            per_subtask.append(list(work.task.samples([sub], config.samples, loaded.tokenizer, config.length,
                                                      config.seed)))
        except ValueError as err:
            raise UsageError(str(err)) from None
    # round robin (sample 0 of every subtask, then sample 1, ...): a sweep stopped part-way has as many
    # samples of every subtask, give or take one, so its macro mean is not one subtask's
    samples = [s for group in itertools.zip_longest(*per_subtask) for s in group if s is not None]
    index, count = config.shard
    samples = samples[index::count]
    expected = set().union(*(runner.expected_keys(s, work.task.name) for s in samples))
    done = resume_keys(config.out, expected, config.retry_errors, log) if config.resume else set()
    model, dtype = runner.meta["model"], runner.meta["dtype"]
    others = other_dtypes(done, model, work.task.name, dtype)
    if others:
        log(f"kvbench: warning: {config.out} already holds {' and '.join(others)} rows of {model} on "
            f"{work.task.name}; this run writes {dtype}, a separate line on the leaderboard "
            f"(--dtype {others[0]} resumes them)")
    todo = [s for s in samples if not runner.expected_keys(s, work.task.name) <= done]
    rows_todo = sum(len(runner.expected_keys(s, work.task.name)) for s in todo)
    shard = f", shard {index}/{count}" if count > 1 else ""
    log(f"kvbench: {len(todo)} samples ({len(samples) - len(todo)} already written{shard}) × methods "
        f"{','.join(config.methods)} × ratios {','.join(map(str, config.ratios)) or 'measured'} = {rows_todo} rows "
        f"on {runner.meta['device']} ({runner.meta['dtype']})")
    writer = ResultsWriter(config.out, runner.run_id)
    start, rows_done = time.monotonic(), 0
    with tqdm(total=rows_todo, unit="row", disable=None if progress is None else not progress,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for number, sample in enumerate(todo, 1):
            rows = [r for r in runner.run_sample(sample, work.task.name) if row_key(r) not in done]
            writer.add(rows)
            bar.update(len(rows))
            rows_done += len(rows)
            scores = " | ".join(f"{r['method']}@{'τ' if r['target_ratio'] is None else format(r['target_ratio'], 'g')} "
                                + ("error" if r.get("error") else f"{r['score']:.0f}") for r in rows)
            elapsed = time.monotonic() - start
            left = elapsed / rows_done * (rows_todo - rows_done) if rows_done else float("nan")
            with tqdm.external_write_mode():
                log(f"[{number}/{len(todo)}, {_clock(elapsed)} elapsed, ~{_clock(left)} left] "
                    f"{work.task.name}:{sample.subtask} {sample.sample_id}: {scores}")
    if not writer.rows:
        log("kvbench: nothing to do: every row is already written")
        return Outcome(None, empty_frame())
    return Outcome(writer.path, read_part(writer.path))


def _clock(seconds: float) -> str:
    """m:ss, the way a progress bar shows time."""
    if not seconds == seconds:  # NaN: nothing measured yet
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"
