"""Reading and writing results: parquet part files, one per process, written atomically.

Each process writes its own part file ``<out>/<run_id>.parquet`` and rewrites it whole (temporary
file + rename) after every sample, so a crash loses at most the sample in flight and never leaves a
half-written file. A results folder is the union of its part files; readers conform each file to
:data:`~kvbench.results.schema.SCHEMA` and set aside (with the reason) any that is not a results file.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvbench.results.schema import COLUMNS, SCHEMA, row_key

# Without these a file cannot be ranked at all; every other SCHEMA column may be missing (older part
# files) and is then left empty.
REQUIRED = ["model", "task", "subtask", "sample_id", "method", "target_ratio", "score"]
FLOAT_COLUMNS = [f.name for f in SCHEMA if pa.types.is_floating(f.type)]


def git_sha() -> str | None:
    """The commit of the kvbench checkout, if it is one (None for an installed wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class ResultsWriter:
    """Accumulates rows and rewrites this process's part file atomically on every flush."""

    def __init__(self, out_dir: Path, run_id: str):
        self.path = Path(out_dir) / f"{run_id}.parquet"
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        unknown = set().union(*(row.keys() for row in rows)) - set(COLUMNS) if rows else set()
        if unknown:
            raise KeyError(f"unknown result columns: {sorted(unknown)}")
        for row in rows:
            for column in FLOAT_COLUMNS:
                value = row.get(column)
                if value is not None and not math.isfinite(value):
                    raise ValueError(f"{column} = {value} in a row of {row.get('method')}: only finite numbers "
                                     "are written")
        self.rows.extend(rows)
        self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in self.rows], schema=SCHEMA)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def part_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Parquet files under ``folder`` (or the file itself), hidden ones and temporaries left out."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        return []
    found = folder.rglob("*.parquet") if recursive else folder.glob("*.parquet")
    return sorted(p for p in found if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_part(path: Path) -> pd.DataFrame:
    """One part file conformed to SCHEMA; raises ValueError saying why it is not a results file."""
    try:
        table = pq.read_table(path)
    except Exception as err:  # noqa: BLE001 — any unreadable file is reported, never fatal
        raise ValueError(f"unreadable parquet ({type(err).__name__}: {err})") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"not a kvbench results file: missing columns {', '.join(missing)}")
    columns = {}
    for fld in SCHEMA:
        if fld.name in table.column_names:
            try:
                columns[fld.name] = table.column(fld.name).cast(fld.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ValueError(
                    f"column {fld.name} is {table.schema.field(fld.name).type}, expected {fld.type}"
                ) from None
        else:
            columns[fld.name] = pa.nulls(table.num_rows, fld.type)
    for column in FLOAT_COLUMNS:  # checked before pandas, which cannot tell NaN from an empty cell
        if pc.all(pc.is_finite(columns[column])).as_py() is False:
            raise ValueError(f"column {column} holds NaN or infinite values")
    return pa.table(columns, schema=SCHEMA).to_pandas()


def empty_frame() -> pd.DataFrame:
    return pa.table({f.name: pa.array([], f.type) for f in SCHEMA}, schema=SCHEMA).to_pandas()


@dataclass
class Loaded:
    frame: pd.DataFrame  # every readable row, SCHEMA columns
    files: list[str] = field(default_factory=list)  # part files read, relative to the folder
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def load(folder: Path, recursive: bool = True) -> Loaded:
    """Every readable part file under ``folder`` as one frame; unreadable or foreign files are skipped."""
    folder = Path(folder)
    frames, files, skipped = [], [], []
    for path in part_files(folder, recursive):
        name = str(path.relative_to(folder)) if folder.is_dir() else path.name
        try:
            part = read_part(path)
        except ValueError as err:
            skipped.append((name, str(err)))
            continue
        files.append(name)
        if len(part):
            frames.append(part)
    frame = pd.concat(frames, ignore_index=True) if frames else empty_frame()
    return Loaded(frame, files, skipped)


def read_results(path: Path) -> pd.DataFrame:
    """Every part file under ``path`` (a folder or one file) as one frame; a bad file is an error."""
    loaded = load(path)
    if loaded.skipped:
        name, why = loaded.skipped[0]
        raise ValueError(f"{name}: {why}")
    return loaded.frame


def written_keys(out: Path) -> set[tuple]:
    """Keys of every row in the part files directly in ``out`` (not in sub-folders such as a baseline)."""
    frame = load(out, recursive=False).frame if Path(out).is_dir() else empty_frame()
    return {row_key(row) for row in frame.to_dict("records")}


def set_aside_unreadable(out: Path, log=print) -> list[Path]:
    """Rename every unreadable part file directly in ``out`` to ``<name>.unreadable`` (kept, never
    deleted, and no longer read), with a warning; its rows are then missing and a resume recomputes
    them. Files that are readable parquet but not results files are only reported."""
    out = Path(out)
    moved = []
    for name, why in load(out, recursive=False).skipped if out.is_dir() else []:
        path = out / name
        if not why.startswith("unreadable parquet"):
            log(f"kvbench: warning: {path} is not read ({why})")
            continue
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        moved.append(aside)
        log(f"kvbench: warning: {path} is unreadable ({why}); moved to {aside.name} and its rows will be recomputed")
    return moved


def error_rows(out: Path) -> dict[tuple, str]:
    """Key -> error of every row written with an error directly in ``out``."""
    frame = load(out, recursive=False).frame if Path(out).is_dir() else empty_frame()
    failed = frame[frame["error"].notna()]
    return {row_key(row): row["error"] for row in failed.to_dict("records")}


def drop_rows(out: Path, keys: set[tuple]) -> int:
    """Remove the rows with these keys from the part files directly in ``out`` (each file rewritten
    atomically, as the writer does); returns how many rows went. Used before error rows are retried,
    so the retried row does not sit beside the failed one."""
    dropped = 0
    for path in part_files(Path(out), recursive=False):
        try:
            frame = read_part(path)
        except ValueError:
            continue
        keep = [row_key(row) not in keys for row in frame.to_dict("records")]
        if all(keep):
            continue
        dropped += len(keep) - sum(keep)
        table = pa.Table.from_pandas(frame[keep], schema=SCHEMA, preserve_index=False)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return dropped


def remove_temporaries(out: Path, log=print) -> int:
    """Delete the writer's temporary files (``.<part>.parquet.tmp``) a killed process left in ``out``.
    Call only while no other process writes there (the sweep lock says so)."""
    removed = 0
    for tmp in Path(out).glob(".*.parquet.tmp") if Path(out).is_dir() else []:
        tmp.unlink(missing_ok=True)
        removed += 1
    if removed:
        log(f"kvbench: removed {removed} temporary file{'s' if removed > 1 else ''} a stopped run left in {out}")
    return removed
