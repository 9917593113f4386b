"""Every registered method through ``kvbench run`` under every eviction moment, with a short interval.

Each method runs on the tiny Llama with every combination of ``--evict-during-prefill`` and
``--evict-during-decoding`` at ``--decode-interval 4``, so decode-time eviction really happens within
a short answer (the default interval, 128, hides what breaks there). A method that cannot evict at
a moment must say so in one line with exit code 2 before anything loads; every other run must
write rows without an error. Learned methods get random gates and surrogates for the tiny model.
"""

from __future__ import annotations

import pytest
import torch

from kvbench import plugins
from kvbench.cli import main
from kvbench.core.task import Question, Sample, Task
from kvbench.methods.gated import SinkGate, write_gates
from kvbench.methods.kvzap import Surrogate, write_surrogate
from kvbench.plugins import get_method, list_methods
from kvbench.results import read_results
from tiny_models import save_tiny

TASK = "tiny_recall"
FLAGS = {
    "after the context": [],
    "during prefill": ["--evict-during-prefill"],
    "during decoding": ["--evict-during-decoding"],
    "during both": ["--evict-during-prefill", "--evict-during-decoding"],
}


class TinyRecall(Task):
    """About 300 tokens of the tiny tokenizer's words, one question, a 12-token answer: long enough for
    windows of 128 and for chunks of 32 to matter, short enough to run 28 methods four times."""

    name = TASK

    def subtasks(self) -> list[str]:
        return ["one"]

    def samples(self, subtasks, n_samples, tokenizer, length, seed):
        sentences = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                     "There and back again."]
        context = " ".join(sentences[i % len(sentences)] for i in range(60))
        question = Question("q0", " What colour is the sky?", ["blue"], answer_prefix=" Answer:")
        yield Sample("tiny-0", "one", context, [question], "string_match_all", max_new_tokens=12)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model's folder, a weights folder for gated and kvzap, and the task registered."""
    root = tmp_path_factory.mktemp("moments")
    folder = save_tiny(root / "model", "llama", max_position_embeddings=2048)
    torch.manual_seed(0)
    weights = root / "weights"
    write_gates([SinkGate(64, 2, 2) for _ in range(2)], weights / "gated.safetensors")
    surrogate = Surrogate(64, 2, 2, hidden_dim=8)
    with torch.no_grad():  # predicted log scores around the default τ = -4, so it evicts some
        for layer in surrogate.layers:
            layer[2].bias.fill_(-4.0)
    write_surrogate(surrogate, weights / "kvzap-mlp")
    plugins.list_tasks()  # the built-in tasks first, so the registry is complete
    plugins.TASKS.register(TinyRecall)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide matrices: extra threads cost more in hand-offs than they save
    yield folder, weights
    torch.set_num_threads(threads)
    plugins.TASKS._classes.pop(TASK, None)


def arguments(name: str, flags: list[str], folder, weights, out) -> list[str]:
    method = get_method(name)
    args = ["run", "--method", name, "--model", str(folder), "--task", TASK, "--samples", "1",
            "--prefill-chunk", "32", "--decode-interval", "4", "--dtype", "float32", "--out", str(out), *flags]
    if not method.threshold_mode:  # threshold methods measure their ratio
        args += ["--ratio", "0.5" if method.evicts else "0"]
    if method.reads_question:  # finch's window is the question
        args += ["--query-aware"]
    if "weights" in {f for f in method.config()}:
        args += ["--weights", str(weights)]
    return args


@pytest.mark.parametrize("moment", list(FLAGS))
@pytest.mark.parametrize("name", list_methods())
def test_every_method_runs_or_refuses_in_one_line(name, moment, setup, tmp_path, capsys):
    folder, weights = setup
    out = tmp_path / "out"
    flags = FLAGS[moment]
    method = get_method(name)
    code = main(arguments(name, flags, folder, weights, out))
    err = capsys.readouterr().err
    able = method.incremental or method.manages_cache or not method.evicts
    if flags and not able:
        errors = [line for line in err.splitlines() if line.startswith("kvbench: error:")]
        assert code == 2 and len(errors) == 1
        assert f"{name} cannot evict during {'prefill' if '--evict-during-prefill' in flags else 'decoding'}" \
            in errors[0]
        assert not out.exists()
        return
    assert code == 0, err
    frame = read_results(out)
    rows = frame[frame["method"] == name]
    assert len(rows) == 1 and rows["error"].isna().all(), rows.get("error")
    full = frame[frame["method"] == "full"].iloc[0]
    assert full["new_tokens"] >= 8  # at least two decode-time evictions happen in the method's answer too
    if method.evicts and not method.manages_cache and name != "simlayerkv":
        assert rows["measured_ratio"].iloc[0] > 0  # it did evict something


# Methods that cannot run on a family, and the one line that says why.
REFUSED = {
    "gemma3": {"keyrerotation": "keyrerotation re-rotates keys with one full-width RoPE table",
               "finch": "finch re-rotates keys with one full-width RoPE table"},
}


@pytest.fixture(scope="module", params=["qwen2", "mistral", "phi3", "gemma3"])
def family(request, tmp_path_factory, setup):
    """A tiny model of another family (Phi-3's fused qkv_proj, Gemma 3's sliding and global layers),
    with random gates and surrogates of its shape."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    folder = save_tiny(root / "model", arch, max_position_embeddings=2048)
    layers = 4 if arch == "gemma3" else 2
    torch.manual_seed(0)
    weights = root / "weights"
    write_gates([SinkGate(64, 2, 2) for _ in range(layers)], weights / "gated.safetensors")
    surrogate = Surrogate(64, 2, layers, hidden_dim=8)
    with torch.no_grad():
        for layer in surrogate.layers:
            layer[2].bias.fill_(-4.0)
    write_surrogate(surrogate, weights / "kvzap-mlp")
    return arch, folder, weights


@pytest.mark.parametrize("name", list_methods())
def test_every_method_runs_or_refuses_in_one_line_on_every_family(name, family, tmp_path, capsys):
    """After the context: methods that rebuild queries or keys from attention inputs work on fused
    projections, q/k norms, Gemma's scaling and per-layer-type RoPE, or refuse in one line."""
    arch, folder, weights = family
    out = tmp_path / "out"
    code = main(arguments(name, [], folder, weights, out))
    err = capsys.readouterr().err
    refusal = REFUSED.get(arch, {}).get(name)
    if refusal is not None:
        errors = [line for line in err.splitlines() if line.startswith("kvbench: error:")]
        assert code == 2 and len(errors) == 1 and refusal in errors[0], err
        assert not out.exists() or not any(out.iterdir())
        return
    assert code == 0, err
    frame = read_results(out)
    rows = frame[frame["method"] == name]
    assert len(rows) == 1 and rows["error"].isna().all(), rows.get("error")
    method = get_method(name)
    if method.evicts and not method.manages_cache and name != "simlayerkv":
        assert rows["measured_ratio"].iloc[0] > 0  # it did evict something
