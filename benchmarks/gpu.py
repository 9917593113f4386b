"""The CUDA path: what eviction costs and saves on an 8B model at 4K-32K tokens, one cell at a time.

For each model, context length, method and ratio (0.5 and 0.9 by default), one cell compresses a
context of random token ids through the session (prefill, scoring, eviction: ``Session.compress``)
and decodes from it once per decode-kernel backend. It prints, and writes to ``--out``:

- ``prefill_s`` and ``scoring_s``, and the scoring overhead ``scoring_s / prefill_s`` (Fast KVzip's
  claim for its gates: about 1%; KVzip's repeat pass: 2-3x a prefill);
- ``kv_bytes_physical`` against the full cache's KV bytes, beside the target ``1 - ratio``;
- the cell's peak memory beyond what was allocated when it began (the weights): on CUDA
  ``max_memory_allocated`` after ``reset_peak_memory_stats`` (everything: KV, activations, scoring
  buffers, decoding); on the CPU the session's KV high-water mark plus the attention inputs the
  method held — and that peak against the ``full`` cell's at the same length;
- decode tokens/s with each backend of ``--kernels``: the Triton kernel (``triton``), the PyTorch
  reference one head at a time (``torch``), or the engine's masked SDPA (``sdpa``).

A cell that fails — CUDA out of memory included — or runs past ``--timeout`` seconds is recorded in
its ``error`` column and the sweep goes on. The timeout is an alarm checked between Python steps:
a CUDA kernel already queued finishes first.

The models are ``config:`` models by default: the published Llama-3.1-8B and Qwen3-8B architectures
with seeded random weights (``kvbench.models.CONFIG_MODELS``), so nothing is downloaded. Costs depend
on shapes, not on what the weights know, with one exception: which entries a method keeps, so
``measured_ratio`` and the bytes of non-uniform allocations follow random-weight attention. Learned
methods get random weights of the published shapes, since no trained ones exist for these models:
``gated`` Fast KVzip's gates (16 sinks of width 16), ``kvzap_ratio`` KVzap's linear surrogate.

Methods (``--methods``; ``all``: every registered one that runs without a question): by default one
per way of scoring — recency (``window``), keys alone (``knorm``), the last 64 queries' attention
(``snapkv``), the last query's (``tova``), query statistics (``expected_attention``), every query's
attention accumulated (``h2o``), a teacher-forced repeat of the context (``kvzip``), learned gates
(``gated``) and a learned surrogate (``kvzap_ratio``). Wrappers cost their base's scoring plus a cut.

    python benchmarks/gpu.py                       # on CUDA: both 8B models, 4K-32K, writes benchmarks/gpu.txt
    python benchmarks/gpu.py --models config:llama-3.1-8b --lengths 4096,32768 --kernels triton,torch
    python benchmarks/gpu.py --dry-run             # the CPU, tiny models, 128 tokens (CI)
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

DEFAULT_METHODS = "window,knorm,snapkv,tova,expected_attention,h2o,kvzip,gated,kvzap_ratio"
DEFAULT_MODELS = "config:llama-3.1-8b,config:qwen3-8b"
DRY_MODELS = "config:llama-3.1-8b-tiny,config:qwen3-8b-tiny"
CHUNK = 512  # prefill chunk, kvbench's default


class CellTimeout(Exception):
    """A cell ran past ``--timeout`` seconds."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`CellTimeout` in this (main) thread after ``seconds`` (None: no limit)."""
    if not seconds:
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(f"cell ran past {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Row:
    model: str
    length: int
    method: str
    ratio: float | None  # None: the full cache, or a method that measures its ratio (threshold)
    prefill_s: float | None = None
    scoring_s: float | None = None
    measured_ratio: float | None = None
    kv_full: int | None = None
    kv_physical: int | None = None
    peak: int | None = None
    peak_kind: str = ""
    decode: dict[str, float] = field(default_factory=dict)  # backend asked for -> tokens/s
    ran: dict[str, str] = field(default_factory=dict)  # backend asked for -> backend that ran
    error: str | None = None


def random_learned_weights(model, folder: Path, seed: int) -> dict[str, str]:
    """Random weights of the published shapes for the learned methods (timing and memory only)."""
    from kvbench.methods.gated import SinkGate, write_gates
    from kvbench.methods.kvzap import Surrogate, write_surrogate

    config = model.config
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    generator = torch.random.fork_rng()
    with generator:
        torch.manual_seed(seed)
        gates = [SinkGate(config.hidden_size, kv_heads, group) for _ in range(config.num_hidden_layers)]
        for gate in gates:
            torch.nn.init.normal_(gate.k_base, std=1.0)
        write_gates(gates, folder / "gated.safetensors")
        write_surrogate(Surrogate(config.hidden_size, kv_heads, config.num_hidden_layers), folder / "kvzap-linear")
    return {"gated": str(folder / "gated.safetensors"), "kvzap_ratio": str(folder / "kvzap-linear")}


def build_methods(names: list[str], weights: dict[str, str], seed: int):
    from kvbench.plugins import build_method

    built = []
    for name in names:
        options = {"weights": weights[name]} if name in weights else {}
        if name == "kvzap_ratio":
            options["kind"] = "linear"
        built.append(build_method(name, options, {"seed": seed}, name))
    return built


def all_methods() -> list[str]:
    from kvbench.plugins import get_method, list_methods

    usable = []
    for name in list_methods():
        try:
            method = get_method(name)
        except (TypeError, ValueError):
            continue
        if method.evicts and not method.reads_question:
            usable.append(name)
    return usable


def run_cell(session, loaded, ids, method, ratio, kernels: list[str], decode_tokens: int, timeout):
    """One (method, ratio) cell: compress, then decode once per backend. Returns the filled row."""
    from kvbench.core.budget import Budget
    from kvbench.kernels import resolve_backend
    from kvbench.run.runner import error_line, release_failed_cell

    device = session.device
    row = Row(loaded.name, ids.shape[1], method.name, ratio)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        with time_limit(timeout):
            if method.evicts:
                budget = Budget(None if method.threshold_mode else ratio, method.allocation)
                compressed = session.compress(ids, method, budget)
            else:
                compressed = session.full(session.prefill(ids), method)
            row.prefill_s, row.scoring_s = compressed.prefill_s, compressed.scoring_s
            row.measured_ratio = compressed.eviction.measured_ratio
            row.kv_full, row.kv_physical = compressed.kv_bytes_full, compressed.kv_bytes_physical
            cpu_peak = compressed.peak_bytes
            for backend in kernels:
                session.decode_kernels = backend
                answer = session.answer(compressed, None, decode_tokens)
                steps = len(answer.tokens) - 1  # the first token comes from the prefill's logits
                row.decode[backend] = steps / answer.seconds if steps > 0 and answer.seconds > 0 else float("nan")
                row.ran[backend] = "sdpa" if backend == "sdpa" else resolve_backend(backend, device)
                cpu_peak = max(cpu_peak, answer.peak_bytes)
            del compressed
        peak, row.peak_kind = session.peak(cpu_peak)
        row.peak = peak - base
    except Exception as err:  # noqa: BLE001  (out of memory and timeouts included: recorded, the sweep goes on)
        row.error = error_line(err)
        release_failed_cell(err, device)
    return row


def table(rows: list[Row], kernels: list[str]) -> list[str]:
    """One line per cell; ratios of bytes and peaks against the same model and length's full cell."""
    full_peak = {(r.model, r.length): r.peak for r in rows if r.method == "full" and r.peak}
    head = (f"{'model':24s} {'tokens':>6s} {'method':18s} {'ratio':>5s} {'meas.':>5s} {'prefill_s':>9s} "
            f"{'scoring_s':>9s} {'score/pf':>8s} {'phys/full':>9s} {'1-r':>5s} {'peak_MB':>9s} {'peak/full':>9s} "
            + " ".join(f"{'tok/s ' + k:>13s}" for k in kernels) + "  error")
    lines = [head]
    for r in rows:
        def num(value, spec):
            return format(value, spec) if value is not None else "-"
        overhead = r.scoring_s / r.prefill_s if r.scoring_s is not None and r.prefill_s else None
        physical = r.kv_physical / r.kv_full if r.kv_physical is not None and r.kv_full else None
        base = full_peak.get((r.model, r.length))
        peak_ratio = r.peak / base if r.peak is not None and base else None
        target = None if r.ratio is None else 1 - r.ratio
        decode = " ".join(num(r.decode.get(k), "13.1f") + ("" if r.ran.get(k, k) == k else "*") for k in kernels)
        lines.append(
            f"{r.model:24s} {r.length:6d} {r.method:18s} {num(r.ratio, '5.2f'):>5s} {num(r.measured_ratio, '5.2f'):>5s} "
            f"{num(r.prefill_s, '9.3f'):>9s} {num(r.scoring_s, '9.3f'):>9s} {num(overhead, '8.3f'):>8s} "
            f"{num(physical, '9.3f'):>9s} {num(target, '5.2f'):>5s} {num(r.peak and r.peak / 2**20, '9.1f'):>9s} "
            f"{num(peak_ratio, '9.3f'):>9s} {decode}  {r.error or ''}")
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated (default {DEFAULT_MODELS}; dry run {DRY_MODELS})")
    parser.add_argument("--lengths", help="context tokens (default 4096,8192,16384,32768; dry run 128)")
    parser.add_argument("--ratios", default="0.5,0.9", help="fractions evicted (default 0.5,0.9)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated, or 'all' (the full cache always runs)")
    parser.add_argument("--kernels", default="triton,torch",
                        help="decode backends, comma-separated: triton, torch (PyTorch reference), sdpa (default triton,torch)")
    parser.add_argument("--decode-tokens", type=int, help="greedy tokens per decode (default 32; dry run 4)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cell (default 600; 0: none)")
    parser.add_argument("--device", default=None, help="default cuda (the CPU for --dry-run)")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA (float32 for --dry-run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, Triton interpreted")
    parser.add_argument("--out", type=Path, help="write the table here (default benchmarks/gpu.txt; dry run: nowhere)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:  # the interpreter is chosen when triton is first imported, so before kvbench
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        models = (args.models or (DRY_MODELS if args.dry_run else DEFAULT_MODELS)).split(",")
        lengths = [int(x) for x in (args.lengths or ("128" if args.dry_run else "4096,8192,16384,32768")).split(",")]
        ratios = [float(x) for x in args.ratios.split(",")]
    except ValueError:
        print("gpu.py: --lengths takes integers and --ratios numbers, comma-separated", file=sys.stderr)
        return 2
    decode_tokens = args.decode_tokens or (3 if args.dry_run else 32)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]

    from kvbench.core import attention, engine
    from kvbench.core.session import Session
    from kvbench.errors import UsageError
    from kvbench.models import CONFIG_MODELS, CONFIG_PREFIX, is_config_model, load_config_model, load_model
    from kvbench.plugins import get_method, list_methods
    from kvbench.run.config import check_ratio

    try:
        for ratio in ratios:
            check_ratio(ratio)
        if bad := [k for k in kernels if k not in ("triton", "torch", "sdpa")] or not kernels:
            raise UsageError(f"unknown kernels {', '.join(bad) or 'none given'} (choose from triton, torch, sdpa)")
        names = all_methods() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
        if unknown := [n for n in names if n not in list_methods()]:
            raise UsageError(f"unknown method {', '.join(unknown)} (known: {', '.join(list_methods())})")
        if unknown := [m for m in models if is_config_model(m) and m.removeprefix(CONFIG_PREFIX) not in CONFIG_MODELS]:
            raise UsageError(f"unknown config model {', '.join(unknown)} (known: "
                             f"{', '.join(CONFIG_PREFIX + n for n in CONFIG_MODELS)})")
        if not args.dry_run and args.device is None and not torch.cuda.is_available():
            raise UsageError("needs CUDA (or --device cpu, or --dry-run for tiny models on the CPU)")
        device = args.device or ("cpu" if args.dry_run else None)
        dtype = args.dtype or ("float32" if args.dry_run else None)
    except UsageError as err:
        print(f"gpu.py: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else (None if args.dry_run else Path(__file__).with_name("gpu.txt"))

    lines = [f"# benchmarks/gpu.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"# command: python benchmarks/gpu.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip()]
    rows: list[Row] = []
    header_printed = False
    for spec in models:
        try:
            loaded = (load_config_model(spec, device, dtype, args.seed) if is_config_model(spec)
                      else load_model(spec, device, dtype))
        except UsageError as err:
            print(f"gpu.py: {err}", file=sys.stderr)
            return 2
        model = loaded.model
        attention.install(model)
        dev = loaded.device
        if not header_printed:
            name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
            load = os.getloadavg() if hasattr(os, "getloadavg") else ()
            lines += [f"# device: {name}; {str(loaded.dtype).removeprefix('torch.')}; torch {torch.__version__}; "
                      f"load average {' '.join(f'{x:.2f}' for x in load)}",
                      f"# decode: {decode_tokens} greedy tokens from the compressed context, tok/s = (tokens - 1) / "
                      "seconds; * = the backend fell back to the PyTorch path",
                      "# peak_MB: the cell's peak beyond the weights; peak/full: against the full cell at that length;"
                      " score/pf: scoring_s / prefill_s; phys/full: kv_bytes_physical / the full cache's KV bytes", ""]
            print("\n".join(lines), flush=True)
            header_printed = True
        session = Session(model, CHUNK, eos_ids=set())  # every decode runs its full length
        with tempfile.TemporaryDirectory() as folder:
            weights = random_learned_weights(model, Path(folder), args.seed)
            try:
                methods = [get_method("full"), *build_methods(names, weights, args.seed)]
            except (ValueError, TypeError) as err:
                print(f"gpu.py: {err}", file=sys.stderr)
                return 2
            for method in methods:
                method.setup(model, loaded.tokenizer)  # KVzip's repeat prompt: the byte stand-in
            vocab = model.config.vocab_size
            # Compile the Triton kernels and warm every method's path before anything is timed: on CUDA
            # every method once (uniform and padded layouts), decoding past a multiple of 16 entries
            # (Triton specialises integer arguments on it); the dry run warms the full cache only.
            warm = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(args.seed)).to(dev)
            for method in methods if dev.type == "cuda" else methods[:1]:
                run_cell(session, loaded, warm, method, None if not method.evicts else ratios[0], kernels,
                         20 if dev.type == "cuda" else 3, None)
            for length in lengths:
                ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(args.seed + length))
                ids = ids.to(dev)
                for method in methods:
                    cells = [None] if not method.evicts or method.threshold_mode else ratios
                    for ratio in cells:
                        row = run_cell(session, loaded, ids, method, ratio, kernels, decode_tokens, args.timeout)
                        rows.append(row)
                        printed = table(rows, kernels)
                        if len(rows) == 1:
                            print(printed[0])
                        print(printed[-1], flush=True)
                        if out is not None:  # rewritten after every cell: a long run stopped keeps its rows
                            write(out, lines + printed)
        del session, model, loaded
        engine.synchronize(dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if out is not None:
        write(out, lines + table(rows, kernels))
        print(f"\nwrote {out}")
    return 0


def write(path: Path, lines: list[str]) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)


if __name__ == "__main__":
    sys.exit(main())
