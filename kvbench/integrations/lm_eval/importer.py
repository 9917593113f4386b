"""``kvbench import-lm-eval``: an lm-eval run of ``--model kvbench`` as kvbench result rows.

lm-eval writes ``results_<date>.json`` (aggregates, the model's arguments and, from kvbench's model,
per-document costs under ``config.kvbench``) and, with ``--log_samples``, one
``samples_<task>_<date>.jsonl`` per task (each document's prediction and metric values). One row
is written per (task, document): ``task`` is ``lm-eval/<group>`` (the task's top-level lm-eval
group, or the task itself), so lm-eval tasks never mix with kvbench's own task of the same name
(lm-eval's ``ruler`` is not kvbench's); ``subtask`` is the lm-eval task; ``sample_id`` its doc_id.

The score is the first per-document metric lm-eval reports that is a number and higher-is-better
(``--metric`` picks another), ×100 when lm-eval's values are fractions in [0, 1] (acc,
exact_match, ...) as kvbench's metrics are on 0–100; tasks with several filters (gsm8k's
strict-match and flexible-extract) contribute the first one (``--filter`` picks another).
Columns lm-eval cannot fill (token_match: there is no full-cache answer to compare with;
requested_length) stay empty. A run with ``first_token=prefill`` (not the default protocol) gets
``"first_token": "prefill"`` in its method_config, so the leaderboard shows it as a variant of its
own. Importing the same run again rewrites the same part file.

Needs no lm-eval installation: it reads lm-eval's files only.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import shlex
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm.auto import tqdm

from kvbench.errors import UsageError
from kvbench.results import ResultsWriter

MODEL_NAME = "kvbench"  # the lm-eval model name of kvbench.lm_eval_model
TASK_PREFIX = "lm-eval/"
COST_COLUMNS = (
    "context_tokens", "measured_ratio", "kv_bytes_full", "kv_bytes_kept", "kv_bytes_physical", "peak_mem_bytes",
    "peak_mem_kind", "prefill_s", "scoring_s", "decode_s", "new_tokens",
)
META_COLUMNS = ("kvbench_version", "torch_version", "transformers_version", "device", "dtype", "git_sha",
                "prefill_chunk")


class LmEvalImportError(UsageError):
    """The files are not an importable lm-eval run; the message is one user-facing line."""


class NotKvbenchRun(LmEvalImportError):
    """An lm-eval run of another model: it names no eviction method or ratio."""


@dataclass
class LmEvalRun:
    results_path: Path
    samples: dict[str, Path]  # lm-eval task name → its samples file


def _date_id(path: Path) -> str:
    """The timestamp lm-eval puts after the last underscore of both file names."""
    stem = path.name.removesuffix(".jsonl").removesuffix(".json")
    return stem[stem.rfind("_") + 1:]


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LmEvalImportError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or "configs" not in data or "config" not in data:
        raise LmEvalImportError(f"{path} is not an lm-eval results file (no 'config'/'configs')")
    return data


def _samples_beside(results_path: Path, tasks: list[str]) -> dict[str, Path]:
    date = _date_id(results_path)
    found = {t: results_path.parent / f"samples_{t}_{date}.jsonl" for t in tasks}
    return {t: p for t, p in found.items() if p.is_file()}


def find_runs(path: Path) -> list[LmEvalRun]:
    """The runs named by ``path``: a results JSON, a samples JSONL (its run, that task only), or a
    folder (every results JSON under it)."""
    path = Path(path)
    if not path.exists():
        raise LmEvalImportError(f"{path} does not exist")
    if path.is_dir():
        results = sorted(path.rglob("results_*.json"))
        if not results:
            raise LmEvalImportError(f"no lm-eval results_*.json under {path}")
        runs = [LmEvalRun(r, _samples_beside(r, list(_load_json(r)["configs"]))) for r in results]
    elif path.name.endswith(".jsonl"):
        date = _date_id(path)
        candidates = [p for p in path.parent.glob(f"*{date}.json") if _date_id(p) == date]
        if not candidates:
            raise LmEvalImportError(
                f"no results JSON ending in _{date}.json beside {path}: it names the method and ratio of the run"
            )
        task = next((t for t in _load_json(candidates[0])["configs"]
                     if path.name == f"samples_{t}_{date}.jsonl"), None)
        if task is None:
            raise LmEvalImportError(f"{path} belongs to no task of {candidates[0]}")
        runs = [LmEvalRun(candidates[0], {task: path})]
    else:
        runs = [LmEvalRun(path, _samples_beside(path, list(_load_json(path)["configs"])))]
    for run in runs:
        if not run.samples:
            raise LmEvalImportError(
                f"no samples files beside {run.results_path}: run lm_eval with --log_samples (and --output_path)"
            )
    return runs


def _model_args(config: dict) -> dict:
    args = config.get("model_args") or {}
    if isinstance(args, dict):
        return args
    parsed = {}
    for item in str(args).split(","):
        key, sep, value = item.partition("=")
        if sep:
            parsed[key.strip()] = value.strip()
    return parsed


def _family(task: str, group_subtasks: dict[str, list[str]]) -> str:
    """The outermost lm-eval group that contains ``task`` (mmlu for mmlu_anatomy), else the task."""
    parents = {child: group for group, children in group_subtasks.items() for child in children}
    seen = {task}
    while task in parents and parents[task] not in seen:
        task = parents[task]
        seen.add(task)
    return task


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choose_metric(task: str, samples: list[dict], higher_is_better: dict, wanted: str | None) -> str:
    names = [m for m in samples[0].get("metrics", []) if all(_is_number(s.get(m)) for s in samples)]
    if wanted is not None:
        if wanted not in names:
            raise LmEvalImportError(f"task {task} has no numeric per-sample metric {wanted!r} (it has "
                                    f"{', '.join(names) or 'none'})")
        return wanted
    better = [m for m in names if higher_is_better.get(m, True)]
    if not better:
        raise LmEvalImportError(f"task {task} logs no numeric higher-is-better per-sample metric "
                                f"(it has {', '.join(samples[0].get('metrics', [])) or 'none'}); pick one with --metric")
    return better[0]


def _target(sample: dict):
    """lm-eval writes ``str(target)``: an index, a string or a list's repr."""
    target = sample.get("target")
    if isinstance(target, str) and target[:1] in "[(" and target[-1:] in "])":
        try:
            return ast.literal_eval(target)
        except (ValueError, SyntaxError):
            return target
    return target


def _continuations(sample: dict) -> list[str]:
    args = sample.get("arguments") or {}
    if isinstance(args, dict):
        return [(v or {}).get("arg_1", "") for _, v in sorted(args.items(), key=lambda kv: int(kv[0].split("_")[-1]))]
    return [a[1] if isinstance(a, (list, tuple)) and len(a) > 1 else "" for a in args]


def _prediction_reference(sample: dict, output_type: str) -> tuple[str, str]:
    target = _target(sample)
    responses = sample.get("filtered_resps")
    if output_type == "multiple_choice":
        choices = _continuations(sample)
        lls = [float(r[0]) for r in responses] if responses else []
        prediction = choices[max(range(len(lls)), key=lls.__getitem__)].strip() if lls and choices else ""
        if isinstance(target, str) and target.strip().lstrip("-").isdigit() and choices:
            index = int(target)
            target = choices[index].strip() if 0 <= index < len(choices) else target
        elif isinstance(target, int) and choices and 0 <= target < len(choices):
            target = choices[target].strip()
    elif output_type == "generate_until":
        prediction = responses[0] if isinstance(responses, list) and responses else str(responses or "")
    else:
        prediction = json.dumps(responses)
    references = target if isinstance(target, list) else [target]
    return str(prediction), json.dumps([str(r) for r in references])


def _command(task: str, model_args: dict, config: dict, results: dict) -> str:
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    # `kvbench lm-eval` works with every lm-eval version (0.4.13 finds no plugins for `lm_eval`);
    # an --include_path the run needed is not recorded by lm-eval, so it cannot be given here
    parts = ["kvbench", "lm-eval", "--model", MODEL_NAME, "--model_args", args, "--tasks", task]
    shots = (results.get("n-shot") or {}).get(task)
    if shots:
        parts += ["--num_fewshot", str(shots)]
    if config.get("limit") is not None:
        parts += ["--limit", str(config["limit"])]
    if results.get("chat_template"):
        parts += ["--apply_chat_template"]
    if results.get("fewshot_as_multiturn") and results.get("chat_template"):
        parts += ["--fewshot_as_multiturn"]
    return shlex.join(parts + ["--log_samples"])


def _read_samples(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as err:
        raise LmEvalImportError(f"cannot read {path}: {err}") from None


def _ratio(value, path: Path) -> float:
    """The run's ratio, refused unless a number in [0, 1) (a NaN would slip into every comparison)."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise LmEvalImportError(f"{path}: model_args ratio {value!r} is not a number") from None
    if not (math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise LmEvalImportError(f"{path}: model_args ratio {value!r} is outside [0, 1)")
    return ratio


def run_rows(run: LmEvalRun, metric: str | None = None, filter_name: str | None = None) -> tuple[str, list[dict]]:
    """The run id and the kvbench rows of one lm-eval run."""
    results = _load_json(run.results_path)
    config = results["config"]
    if config.get("model") != MODEL_NAME:
        raise NotKvbenchRun(
            f"{run.results_path} is a run of lm-eval model {config.get('model')!r}: only --model {MODEL_NAME} runs "
            "name an eviction method and ratio"
        )
    model_args = _model_args(config)
    info = config.get(MODEL_NAME) or {}  # KVBenchLM.get_model_info()
    method = info.get("method", model_args.get("method", "full"))
    method_config = info.get("method_config")
    if method_config is not None and info.get("first_token") == "prefill":
        # not the default protocol: the leaderboard must show it apart (it labels variants by config)
        method_config = {**method_config, "first_token": "prefill"}
    created = datetime.fromtimestamp(float(results.get("date") or run.results_path.stat().st_mtime), UTC)
    digest = hashlib.sha1(run.results_path.read_bytes())
    for task in sorted(run.samples):
        digest.update(run.samples[task].read_bytes())
    run_id = f"lm-eval-{created:%Y%m%dT%H%M%S}-{digest.hexdigest()[:8]}"
    common = {
        "run_id": run_id,
        "created_at": created.isoformat(),
        "model": info.get("pretrained", model_args.get("pretrained")),
        "method": method,
        "method_config": json.dumps(method_config, sort_keys=True) if method_config is not None else None,
        "allocation": info.get("allocation", model_args.get("allocation", "uniform")),
        "query_aware": True,
        "target_ratio": _ratio(info.get("target_ratio", model_args.get("ratio", 0.0)), run.results_path),
        "seed": (method_config or {}).get("seed", model_args.get("seed", 0)),
        **{k: info.get(k) for k in META_COLUMNS},
    }
    if common["transformers_version"] is None:
        common["transformers_version"] = results.get("transformers_version")
    per_doc = info.get("per_doc") or {}
    rows = []
    for task, samples_path in sorted(run.samples.items()):
        samples = _read_samples(samples_path)
        if not samples:
            continue
        filters = list(dict.fromkeys(s.get("filter", "none") for s in samples))
        chosen = filter_name if filter_name is not None else filters[0]
        if chosen not in filters:
            raise LmEvalImportError(f"task {task} has no filter {chosen!r} (it has {', '.join(filters)})")
        samples = [s for s in samples if s.get("filter", "none") == chosen]
        task_config = results["configs"].get(task, {})
        name = _choose_metric(task, samples, (results.get("higher_is_better") or {}).get(task, {}), metric)
        fractions = all(0.0 <= s[name] <= 1.0 for s in samples)
        costs = per_doc.get(task, {})
        for sample in samples:
            doc_id = sample["doc_id"]
            prediction, reference = _prediction_reference(sample, task_config.get("output_type", ""))
            doc_costs = costs.get(str(doc_id), {})
            rows.append({
                **common,
                **{k: doc_costs.get(k) for k in COST_COLUMNS},
                "command": _command(task, model_args, config, results),
                "task": TASK_PREFIX + _family(task, results.get("group_subtasks") or {}),
                "subtask": task,
                "sample_id": str(doc_id),
                "question_id": str(doc_id),
                "prediction": prediction,
                "reference": reference,
                "metric": name if chosen == "none" else f"{name},{chosen}",
                "score": 100.0 * sample[name] if fractions else float(sample[name]),
            })
    return run_id, rows


def import_lm_eval(path: Path, out: Path = Path("results"), metric: str | None = None,
                   filter_name: str | None = None, log=print, progress: bool | None = None) -> list[tuple[Path, int]]:
    """Write one part file per lm-eval run found at ``path``; returns (file, rows) for each.

    In a folder, runs of other lm-eval models are skipped with a note; named alone, they are an error.
    ``progress``: a bar over the runs on stderr (None: only when stderr is a terminal).
    """
    written = []
    runs = find_runs(path)
    for run in tqdm(runs, unit="run", disable=None if progress is None else not progress, file=sys.stderr):
        try:
            run_id, rows = run_rows(run, metric, filter_name)
        except NotKvbenchRun as err:
            if not Path(path).is_dir():
                raise
            with tqdm.external_write_mode():
                log(f"kvbench: skipping {run.results_path}: {err}")
            continue
        if not rows:
            continue
        writer = ResultsWriter(out, run_id)
        writer.add(rows)
        written.append((writer.path, len(rows)))
    if not written:
        raise LmEvalImportError(f"no samples to import at {path}")
    return written
