"""``kvbench check``: compare a candidate results folder against a baseline, cell by cell.

A **cell** is (model, task, subtask, method, target_ratio). Inside a cell, rows are paired by
(sample_id, question_id). For each metric compared (``score`` by default, ``token_match`` too with
``--metric score,token_match``; both in points, 0–100), the candidate − baseline difference is
averaged per sample and a seeded paired bootstrap over the samples gives a 95% interval of the mean
difference. A cell **regresses** when the whole interval lies below ``-tolerance`` (default 5
points): the candidate is worse, beyond noise, by more than the tolerance.

Also checked, per cell:

- **config**: method_config, allocation, requested_length, query_aware, prefill_chunk,
  evict_during_prefill, decode_interval, seed, dtype and metric must be equal on both sides; a
  mismatch fails (the numbers are still shown).
- **coverage**: a cell or a (sample, question) pair in the baseline but not the candidate fails
  (``missing``); one only in the candidate is reported (``extra``) and does not fail.
- **errors**: candidate rows with an ``error`` fail; baseline rows with one are reported. Error
  rows are left out of the statistics.
- **macro**: for a task with several subtasks (LongBench, RULER), the per-subtask differences are
  also combined as the benchmark reports them: the unweighted mean over subtasks of each subtask's
  mean difference, with a paired bootstrap stratified by subtask; a macro cell regresses by the same
  rule. Its ``n`` is every sample behind it.
- **memory**: mean ``kv_bytes_physical`` or ``peak_mem_bytes`` (the latter only when both sides
  measured the same ``peak_mem_kind``) growing by more than ``--memory-tolerance`` (default 10%)
  fails.
- **time**: mean prefill + scoring + decode seconds, compared only when both sides ran on the same
  ``device``, growing by more than ``--time-tolerance`` (default 100%, i.e. twice as slow) and by
  more than 0.05 s is flagged as a warning; it fails only with ``--strict-time`` (``device`` says
  ``cpu`` on any CPU, and CI runners are not the machine the baseline was made on).

Exit codes: 0 pass, 1 regression (or missing cells, config mismatch, candidate errors), 2 bad input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.errors import UsageError
from kvbench.results import bootstrap_ci, read_results, stratified_ci

# "variant": the method's name, or its spec where one side holds several specs of it (kvzap at two
# thresholds are two cells, not one); a single spec that changed is a config change of one cell
CELL_COLUMNS = ("model", "task", "subtask", "variant", "target_ratio")
PAIR_COLUMNS = ("sample_id", "question_id")
CONFIG_COLUMNS = (
    "method_config", "allocation", "requested_length", "query_aware", "prefill_chunk",
    "evict_during_prefill", "decode_interval", "seed", "dtype", "metric",
)
METRICS = ("score", "token_match")
SCALE = {"score": 1.0, "token_match": 100.0}  # both reported in points (0-100)
TIME_FLOOR_S = 0.05
REQUIRED = (set(CELL_COLUMNS) - {"variant"}) | {"method"} | set(PAIR_COLUMNS) | {"score", "error"}


class CheckError(UsageError):
    """Bad input: an unreadable folder, no rows, missing columns, a bad option."""


@dataclass
class CheckOptions:
    tolerance: float = 5.0          # points
    metrics: tuple[str, ...] = ("score",)
    memory_tolerance: float = 0.10  # relative
    time_tolerance: float = 1.0     # relative
    strict_time: bool = False
    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0


@dataclass
class MetricResult:
    metric: str
    pairs: int
    samples: int
    baseline: float
    candidate: float
    diff: float
    low: float
    high: float
    regressed: bool
    improved: bool


@dataclass
class CellResult:
    cell: dict
    status: str = "ok"  # ok | regression | missing | extra | config | error | warning
    metrics: list[MetricResult] = field(default_factory=list)
    kv_bytes: tuple[float, float] | None = None
    peak_bytes: tuple[float, float] | None = None
    seconds: tuple[float, float] | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    macro: int = 0  # subtasks a macro cell averages; 0 for a subtask's own cell

    @property
    def name(self) -> str:
        c = self.cell
        if self.macro:
            sub = f"{c['task']} (macro of {self.macro} subtasks)"
        else:
            sub = f"{c['task']}:{c['subtask']}" if c.get("subtask") not in (None, "") else str(c["task"])
        ratio = "τ" if c["target_ratio"] is None else format(c["target_ratio"], "g")  # None: a threshold method
        return f"{c['model']} {sub} {c['variant']}@{ratio}"


@dataclass
class Report:
    options: CheckOptions
    baseline: str
    candidate: str
    cells: list[CellResult]
    notes: list[str]

    @property
    def failed(self) -> bool:
        return any(c.failures for c in self.cells)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.cells:
            out[c.status] = out.get(c.status, 0) + 1
        return out


def load(path: Path, side: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise CheckError(f"{side} {path} does not exist")
    if path.is_dir() and not any(path.rglob("*.parquet")):
        raise CheckError(f"{side} {path} holds no .parquet files")
    try:
        frame = read_results(path)
    except Exception as err:  # noqa: BLE001 - any unreadable parquet is bad input
        raise CheckError(f"{side} {path} is not readable: {type(err).__name__}: {err}") from None
    missing = REQUIRED - set(frame.columns)
    if missing:
        raise CheckError(f"{side} {path} lacks columns {sorted(missing)}")
    if frame.empty:
        raise CheckError(f"{side} {path} has no rows")
    spec = frame["method_spec"] if "method_spec" in frame else pd.Series(None, index=frame.index, dtype=object)
    spec = spec.fillna(frame["method"])  # files older than the column: the name is the spec
    several = spec.groupby([frame["model"], frame["task"], frame["method"]]).transform("nunique") > 1
    frame["variant"] = spec.where(several, frame["method"])
    return frame


def _plain(value):
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return round(float(value), 9)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, float):
        return round(value, 9)
    return value


def _key(row, columns) -> tuple:
    return tuple(_plain(row[c]) if c in row else None for c in columns)


def _prepare(frame: pd.DataFrame, side: str, notes: list[str]) -> dict[tuple, pd.DataFrame]:
    frame = frame.copy()
    frame["_cell"] = [_key(r, CELL_COLUMNS) for r in frame.to_dict("records")]
    frame["_pair"] = [_key(r, PAIR_COLUMNS) for r in frame.to_dict("records")]
    dup = frame.duplicated(["_cell", "_pair"], keep="last")
    if dup.any():
        notes.append(f"{side}: {int(dup.sum())} duplicate rows (same cell, sample and question); the last kept")
        frame = frame[~dup]
    return {cell: group for cell, group in frame.groupby("_cell", sort=False)}


def _configs(group: pd.DataFrame) -> dict[str, set]:
    return {c: {_plain(v) for v in group[c]} if c in group else {None} for c in CONFIG_COLUMNS}


def _short(values: set) -> str:
    text = ", ".join(sorted(map(str, values)))
    return text if len(text) <= 60 else text[:57] + "..."


def _mean(series: pd.Series) -> float | None:
    values = pd.to_numeric(series, errors="coerce").dropna()
    return float(values.mean()) if len(values) else None


def compare_cell(cell: dict, base: pd.DataFrame, cand: pd.DataFrame, options: CheckOptions,
                 per_sample: dict | None = None) -> CellResult:
    """One subtask's cell; ``per_sample`` (if given) receives, per metric, the per-sample baseline,
    candidate and difference means the macro cells combine."""
    result = CellResult(cell)
    base_cfg, cand_cfg = _configs(base), _configs(cand)
    for column in CONFIG_COLUMNS:
        if base_cfg[column] != cand_cfg[column]:
            result.failures.append(f"config {column}: {_short(base_cfg[column])} → {_short(cand_cfg[column])}")
    if result.failures:
        result.status = "config"

    base_err = base["error"].notna() & (base["error"].astype(str) != "")
    cand_err = cand["error"].notna() & (cand["error"].astype(str) != "")
    if cand_err.any():
        first = str(cand.loc[cand_err, "error"].iloc[0]).splitlines()[0][:80]
        result.failures.append(f"{int(cand_err.sum())} candidate rows with an error ({first})")
        result.status = "error"
    if base_err.any():
        result.notes.append(f"{int(base_err.sum())} baseline rows with an error")

    base_pairs, cand_pairs = set(base["_pair"]), set(cand["_pair"])
    lost, gained = base_pairs - cand_pairs, cand_pairs - base_pairs
    if lost:
        result.failures.append(f"{len(lost)} (sample, question) pairs missing from the candidate")
        result.status = "missing" if result.status == "ok" else result.status
    if gained:
        result.notes.append(f"{len(gained)} extra (sample, question) pairs in the candidate (not compared)")

    ok_base = base[~base_err].set_index("_pair")
    ok_cand = cand[~cand_err].set_index("_pair")
    common = [p for p in ok_base.index if p in ok_cand.index]
    if not common:
        if not result.failures:
            result.failures.append("no pair without an error on both sides")
            result.status = "error"
        return result
    b, c = ok_base.loc[common], ok_cand.loc[common]
    samples = np.array([p[0] for p in common], dtype=object)

    for index, metric in enumerate(options.metrics):
        bv = pd.to_numeric(b[metric], errors="coerce").to_numpy(dtype=float) * SCALE[metric]
        cv = pd.to_numeric(c[metric], errors="coerce").to_numpy(dtype=float) * SCALE[metric]
        keep = ~(np.isnan(bv) | np.isnan(cv))
        if not keep.any():
            result.notes.append(f"{metric}: no values on both sides")
            continue
        diff = pd.Series(cv[keep] - bv[keep]).groupby(samples[keep]).mean().to_numpy()
        if per_sample is not None:
            per_sample[metric] = (pd.Series(bv[keep]).groupby(samples[keep]).mean().to_numpy(),
                                  pd.Series(cv[keep]).groupby(samples[keep]).mean().to_numpy(), diff)
        low, high = bootstrap_ci(diff, options.resamples, options.confidence, options.seed + index)
        regressed = high < -options.tolerance
        improved = low > options.tolerance
        result.metrics.append(MetricResult(
            metric, int(keep.sum()), len(diff), float(bv[keep].mean()), float(cv[keep].mean()),
            float(diff.mean()), low, high, regressed, improved,
        ))
        if regressed:
            result.failures.append(
                f"{metric} {diff.mean():+.1f} points, {options.confidence:.0%} interval [{low:+.1f}, {high:+.1f}] "
                f"below -{options.tolerance:g}")
            result.status = "regression" if result.status in ("ok", "missing") else result.status

    def grew(before: float | None, after: float | None, tolerance: float) -> bool:
        return before is not None and after is not None and after > before * (1 + tolerance)

    kv = (_mean(b.get("kv_bytes_physical", pd.Series(dtype=float))),
          _mean(c.get("kv_bytes_physical", pd.Series(dtype=float))))
    if None not in kv:
        result.kv_bytes = kv
        if grew(*kv, options.memory_tolerance):
            result.failures.append(f"kv_bytes_physical {kv[0]:.4g} → {kv[1]:.4g} (+{kv[1] / kv[0] - 1:.0%})")
            result.status = "regression" if result.status == "ok" else result.status
    kinds = ({_plain(v) for v in b["peak_mem_kind"]} if "peak_mem_kind" in b else set(),
             {_plain(v) for v in c["peak_mem_kind"]} if "peak_mem_kind" in c else set())
    peak = (_mean(b.get("peak_mem_bytes", pd.Series(dtype=float))),
            _mean(c.get("peak_mem_bytes", pd.Series(dtype=float))))
    if None not in peak:
        if kinds[0] == kinds[1] and len(kinds[0]) == 1:
            result.peak_bytes = peak
            if grew(*peak, options.memory_tolerance):
                result.failures.append(f"peak_mem_bytes {peak[0]:.4g} → {peak[1]:.4g} (+{peak[1] / peak[0] - 1:.0%})")
                result.status = "regression" if result.status == "ok" else result.status
        else:
            result.notes.append(f"peak memory not compared: peak_mem_kind {_short(kinds[0])} vs {_short(kinds[1])}")

    devices = ({_plain(v) for v in b["device"]} if "device" in b else set(),
               {_plain(v) for v in c["device"]} if "device" in c else set())
    if devices[0] == devices[1] and len(devices[0]) == 1 and None not in devices[0]:
        def seconds(frame):
            parts = [pd.to_numeric(frame[col], errors="coerce") for col in ("prefill_s", "scoring_s", "decode_s")
                     if col in frame]
            return _mean(sum(p.fillna(0) for p in parts)) if parts else None

        t = (seconds(b), seconds(c))
        if None not in t:
            result.seconds = t
            if grew(*t, options.time_tolerance) and t[1] - t[0] > TIME_FLOOR_S:
                message = f"time {t[0]:.3g} s → {t[1]:.3g} s (+{t[1] / t[0] - 1:.0%}) on {next(iter(devices[0]))}"
                if options.strict_time:
                    result.failures.append(message)
                    result.status = "regression" if result.status == "ok" else result.status
                else:
                    result.warnings.append(message)
                    result.status = "warning" if result.status == "ok" else result.status
    else:
        result.notes.append(f"time not compared: device {_short(devices[0])} vs {_short(devices[1])}")
    return result


def compare(baseline: pd.DataFrame, candidate: pd.DataFrame, options: CheckOptions,
            baseline_name: str = "baseline", candidate_name: str = "candidate") -> Report:
    unknown = set(options.metrics) - set(METRICS)
    if unknown or not options.metrics:
        raise CheckError(f"--metric takes {', '.join(METRICS)}, not {','.join(sorted(unknown)) or 'nothing'}")
    for name, frame in (("baseline", baseline), ("candidate", candidate)):
        absent = [m for m in options.metrics if m not in frame.columns]
        if absent:
            raise CheckError(f"{name} lacks columns {absent}")
    notes: list[str] = []
    base_cells = _prepare(baseline, "baseline", notes)
    cand_cells = _prepare(candidate, "candidate", notes)
    cells, per_sample = [], {}
    for key in sorted(set(base_cells) | set(cand_cells), key=lambda k: tuple(str(v) for v in k)):
        cell = dict(zip(CELL_COLUMNS, key))
        if key not in cand_cells:
            cells.append(CellResult(cell, "missing", failures=["cell missing from the candidate"]))
        elif key not in base_cells:
            cells.append(CellResult(cell, "extra", notes=["cell only in the candidate (not compared)"]))
        else:
            per_sample[key] = {}
            cells.append(compare_cell(cell, base_cells[key], cand_cells[key], options, per_sample[key]))
    return Report(options, baseline_name, candidate_name, cells + macro_cells(cells, per_sample, options), notes)


def macro_cells(cells: list[CellResult], per_sample: dict, options: CheckOptions) -> list[CellResult]:
    """One cell per (model, task, method, ratio) with several subtasks: the macro mean difference over
    its subtasks, with a paired bootstrap stratified by subtask."""
    groups: dict[tuple, list[CellResult]] = {}
    for c in cells:
        if c.status != "extra":
            groups.setdefault(_key(c.cell, ("model", "task", "variant", "target_ratio")), []).append(c)
    out = []
    for key, members in groups.items():
        subtasks = {c.cell["subtask"] for c in members}
        if len(subtasks) < 2:
            continue
        result = CellResult({**members[0].cell, "subtask": None}, macro=len(subtasks))
        for index, metric in enumerate(options.metrics):
            parts = [per_sample[_key(c.cell, CELL_COLUMNS)][metric] for c in members
                     if metric in per_sample.get(_key(c.cell, CELL_COLUMNS), {})]
            if len(parts) < len(subtasks):
                result.notes.append(f"{metric}: {len(subtasks) - len(parts)} of {len(subtasks)} subtasks not "
                                    "compared (see their cells); the macro mean is over the rest")
            if not parts:
                continue
            pairs = sum(m.pairs for c in members for m in c.metrics if m.metric == metric)
            diff = float(np.mean([d.mean() for _, _, d in parts]))
            low, high = stratified_ci([d for _, _, d in parts], options.resamples, options.confidence,
                                      options.seed + 1000 + index)
            regressed, improved = high < -options.tolerance, low > options.tolerance
            result.metrics.append(MetricResult(
                metric, int(pairs), int(sum(len(d) for _, _, d in parts)),
                float(np.mean([b.mean() for b, _, _ in parts])), float(np.mean([c.mean() for _, c, _ in parts])),
                diff, low, high, regressed, improved))
            if regressed:
                result.failures.append(
                    f"{metric} macro {diff:+.1f} points, {options.confidence:.0%} interval [{low:+.1f}, {high:+.1f}] "
                    f"below -{options.tolerance:g}")
                result.status = "regression"
        out.append(result)
    return out


def check(baseline: Path, candidate: Path, options: CheckOptions) -> Report:
    return compare(load(baseline, "baseline"), load(candidate, "candidate"), options, str(baseline), str(candidate))
