"""Rendering a :class:`~kvbench.check.compare.Report` as text, Markdown (a PR comment, a job summary) or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from kvbench.check.compare import MetricResult, Report


def _bytes(pair) -> str:
    if pair is None:
        return "—"
    before, after = pair
    change = "" if before == after else f" ({after / before - 1:+.0%})" if before else ""
    return f"{after / 2**20:.2f} MiB{change}"


def _secs(pair) -> str:
    if pair is None:
        return "—"
    before, after = pair
    return f"{before:.2f}→{after:.2f} s"


def _metric_cell(m: MetricResult | None) -> str:
    if m is None:
        return "—"
    return f"{m.baseline:.1f}→{m.candidate:.1f} ({m.diff:+.1f} [{m.low:+.1f}, {m.high:+.1f}])"


def _table(report: Report) -> tuple[list[str], list[list[str]]]:
    metrics = report.options.metrics
    header = ["status", "cell", "n", *[f"{m} (Δ [{report.options.confidence:.0%} CI])" for m in metrics],
              "kv bytes", "peak", "time", "details"]
    rows = []
    for c in report.cells:
        by_metric = {m.metric: m for m in c.metrics}
        n = str(c.metrics[0].samples) if c.metrics else "—"
        details = "; ".join(c.failures + c.warnings + c.notes)
        rows.append([c.status.upper() if c.failures else c.status, c.name, n,
                     *[_metric_cell(by_metric.get(m)) for m in metrics],
                     _bytes(c.kv_bytes), _bytes(c.peak_bytes), _secs(c.seconds), details])
    return header, rows


def _headline(report: Report) -> str:
    failing = [c for c in report.cells if c.failures]
    counts = report.counts()
    parts = [f"{counts[s]} {s}" for s in ("ok", "warning", "regression", "missing", "extra", "config", "error")
             if counts.get(s)]
    verdict = "FAIL" if failing else "PASS"
    o = report.options
    return (f"kvbench check: {verdict}: {len(report.cells)} cells ({', '.join(parts)}); "
            f"metrics {','.join(o.metrics)}, tolerance {o.tolerance:g} points, memory +{o.memory_tolerance:.0%}, "
            f"time +{o.time_tolerance:.0%}{' (strict)' if o.strict_time else ' (warning only)'}")


def render(report: Report, fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps({
            "passed": not report.failed, "baseline": report.baseline, "candidate": report.candidate,
            "options": asdict(report.options), "counts": report.counts(), "notes": report.notes,
            "failing": [c.name for c in report.cells if c.failures],
            "cells": [{**asdict(c), "name": c.name} for c in report.cells],
        }, indent=2, default=str)
    header, rows = _table(report)
    failing = [c for c in report.cells if c.failures]
    if fmt == "markdown":
        esc = lambda s: str(s).replace("|", "\\|")
        lines = [f"### {_headline(report)}", "",
                 f"baseline `{report.baseline}` vs candidate `{report.candidate}`", ""]
        if failing:
            lines += ["**Failing cells:**", ""] + [f"- `{c.name}`: {esc('; '.join(c.failures))}" for c in failing] + [""]
        lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(esc(v) for v in row) + " |" for row in rows]
        lines += [f"- {n}" for n in report.notes]
        return "\n".join(lines) + "\n"
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows)]
    fmt_row = lambda row: "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip()
    lines = [_headline(report), f"baseline {report.baseline} vs candidate {report.candidate}", "",
             fmt_row(header), fmt_row(["-" * w for w in widths]), *map(fmt_row, rows)]
    if failing:
        lines += ["", "failing cells:"] + [f"  {c.name}: {'; '.join(c.failures)}" for c in failing]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
