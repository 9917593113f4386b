"""``kvbench rescore DIR``: recompute every row's ``score`` from its stored prediction and references
with the current metrics, so results made before a metric was fixed stay comparable with new ones.

Only ``score`` changes. Every other column — unknown extra ones included — and the file's schema are
kept as they are, and each part file is rewritten whole through a temporary file and a rename, so
an interrupted rescore leaves every file either old or new. Rows that failed (``error``), rows
without a prediction, rows whose metric kvbench does not know (lm-eval imports score with lm-eval's
own metrics) and rows whose metric needs data the row does not store (``classification`` reads the
sample's class list) keep their score, and the summary says how many and why.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kvbench.errors import UsageError
from kvbench.results import part_files, read_part
from kvbench.tasks.metrics import METRICS
from kvbench.tasks.metrics import score as metric_score

# Metrics whose arguments come from the sample, not the row: ``classification`` needs ``all_classes``.
NEEDS_SAMPLE_DATA = {"classification", "classification_first_line"}
NEEDED = ("prediction", "reference", "metric", "score", "error")


def _new_score(row: dict) -> tuple[float | None, str | None]:
    """The row's score under the current metric, or (None, why it is kept)."""
    if row["error"] is not None:
        return None, "failed rows"
    if row["prediction"] is None or row["reference"] is None:
        return None, "no stored prediction or reference"
    metric = row["metric"]
    if metric in NEEDS_SAMPLE_DATA:
        return None, f"{metric} needs the sample's class list, which rows do not store"
    if metric not in METRICS:
        return None, f"metric {metric!r} is not a kvbench metric"
    try:
        references = json.loads(row["reference"])
    except ValueError:
        return None, "reference is not a JSON list"
    if isinstance(references, str):
        references = [references]
    return float(metric_score(metric, row["prediction"], references)), None


def rescore_file(path: Path, dry_run: bool = False) -> str:
    """Rescore one part file; returns one line saying what changed."""
    read_part(path)  # raises ValueError when it is not a results file
    table = pq.read_table(path)
    missing = [c for c in NEEDED if c not in table.column_names]
    if missing:
        raise ValueError(f"lacks columns {', '.join(missing)}")
    rows = table.select(list(NEEDED)).to_pylist()
    scores, kept, changed, largest = [], {}, 0, 0.0
    for row in rows:
        new, why = _new_score(row)
        old = row["score"]
        if why is not None:
            kept[why] = kept.get(why, 0) + 1
            scores.append(old)
            continue
        if old is None or not math.isclose(new, old, rel_tol=0, abs_tol=1e-9):
            changed += 1
            largest = max(largest, abs(new - (old if old is not None else 0.0)))
        scores.append(new)
    line = f"{path}: {len(rows) - sum(kept.values())} rows rescored, {changed} changed"
    if changed:
        line += f" (largest change {largest:.4g} points)"
    if kept:
        line += "; kept: " + ", ".join(f"{n} ({why})" for why, n in sorted(kept.items()))
    if changed and not dry_run:
        index = table.column_names.index("score")
        column = pa.array(scores, type=table.schema.field(index).type)
        table = table.set_column(index, table.schema.field(index), column)
        tmp = path.with_name(f".{path.name}.rescore.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    elif changed:
        line += " (dry run: not written)"
    return line


def rescore(folder: Path, dry_run: bool = False) -> list[str]:
    """Rescore every part file under ``folder``; files that are not results are named and left alone."""
    folder = Path(folder)
    files = part_files(folder)
    if not files:
        raise UsageError(f"{folder} holds no .parquet part files" if folder.exists()
                         else f"{folder} does not exist")
    lines = []
    for path in files:
        try:
            lines.append(rescore_file(path, dry_run))
        except ValueError as err:
            lines.append(f"{path}: skipped: {err}")
    return lines
