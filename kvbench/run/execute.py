"""``kvbench run`` and ``kvbench sweep``: plan, load the model once, run this shard's samples, write rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from kvbench.errors import UsageError
from kvbench.models import load_model
from kvbench.results import ResultsWriter, remove_temporaries, row_key, summarize
from kvbench.run.config import Plan, RunConfig, plan
from kvbench.run.runner import Runner
from kvbench.run.sweep import FolderLock, resume_keys


def run(config: RunConfig, log=print) -> Path | None:
    """Validate, load the model once, run this shard's samples, write parquet; returns the part file.
    A resuming sweep holds its shard's lock on the folder throughout."""
    work = plan(config)
    if not config.resume:
        return _run(config, work, log)
    with FolderLock(config.out, config.shard, config.command, log) as lock:
        if not lock.others:  # no other shard writing: what a killed run left is garbage
            remove_temporaries(config.out, log)
        return _run(config, work, log)


def _run(config: RunConfig, work: Plan, log) -> Path | None:
    loaded = load_model(config.model, config.device, config.dtype, config.trust_remote_code, log=log)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if max_positions and config.length > max_positions:
        raise UsageError(f"--length {config.length} exceeds what {config.model} can hold ({max_positions} positions)")
    for method in work.methods:  # loads learned weights: missing ones are a one-line error, before any row
        method.setup(loaded.model, loaded.tokenizer)
    runner = Runner(config, loaded, work)
    samples = []
    for sub in work.subtasks:
        try:
            samples += list(work.task.samples([sub], config.samples, loaded.tokenizer, config.length, config.seed))
        except ValueError as err:
            raise UsageError(str(err)) from None
    index, count = config.shard
    samples = samples[index::count]
    expected = set().union(*(runner.expected_keys(s, work.task.name) for s in samples))
    done = resume_keys(config.out, expected, config.retry_errors, log) if config.resume else set()
    todo = [s for s in samples if not runner.expected_keys(s, work.task.name) <= done]
    rows_todo = sum(len(runner.expected_keys(s, work.task.name)) for s in todo)
    shard = f", shard {index}/{count}" if count > 1 else ""
    log(f"kvbench: {len(todo)} samples ({len(samples) - len(todo)} already written{shard}) × methods "
        f"{','.join(config.methods)} × ratios {','.join(map(str, config.ratios)) or 'measured'} = {rows_todo} rows "
        f"on {runner.meta['device']} ({runner.meta['dtype']})")
    writer = ResultsWriter(config.out, runner.run_id)
    with tqdm(total=rows_todo, unit="row", disable=None, dynamic_ncols=True) as bar:
        for sample in todo:
            rows = [r for r in runner.run_sample(sample, work.task.name) if row_key(r) not in done]
            writer.add(rows)
            bar.update(len(rows))
            scores = " | ".join(f"{r['method']}@{'τ' if r['target_ratio'] is None else format(r['target_ratio'], 'g')} "
                                + ("error" if r.get("error") else f"{r['score']:.0f}") for r in rows)
            bar.write(f"{work.task.name}:{sample.subtask} {sample.sample_id}: {scores}")
    if not writer.rows:
        log("kvbench: nothing to do: every row is already written")
        return None
    frame = summarize(pd.DataFrame(writer.rows))
    log("\n" + frame.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    log(f"\nkvbench: wrote {len(writer.rows)} rows to {writer.path}")
    return writer.path
