"""What a kvbench lm-eval run costs, per document: recorded while requests run, stored by lm-eval in
its results JSON (``config.kvbench.per_doc``), read back by ``kvbench import-lm-eval``."""

from __future__ import annotations

from collections import defaultdict


class DocumentCosts:
    """Each prompt's costs (context tokens, measured ratio, KV bytes, times) under its (task, document)."""

    def __init__(self):
        self.records: dict[tuple[str, int], list[dict]] = defaultdict(list)

    def record(self, instance, stats: dict) -> None:
        if instance is not None:
            self.records[(instance.task_name, instance.doc_id)].append(stats)

    def per_doc(self) -> dict[str, dict[str, dict]]:
        """``{task: {doc_id: costs}}``, a document's prompts merged into one record."""
        out: dict[str, dict[str, dict]] = defaultdict(dict)
        for (task, doc_id), records in self.records.items():
            out[task][str(doc_id)] = merge(records)
        return dict(out)


def merge(records: list[dict]) -> dict:
    """One document's costs when it took several prompts (a prompt per choice): times and tokens
    add up, sizes take the largest prompt, the measured ratio is the mean."""
    if len(records) == 1:
        return dict(records[0])
    merged = {}
    for key in {k for r in records for k in r}:
        values = [r[key] for r in records if r.get(key) is not None]
        if not values:
            continue
        if key.endswith("_s") or key == "new_tokens":
            merged[key] = sum(values)
        elif key == "measured_ratio":
            merged[key] = sum(values) / len(values)
        elif isinstance(values[0], str):
            merged[key] = values[0]
        else:
            merged[key] = max(values)
    return merged
