"""Fitting the learned scorers on collected targets, the LLM frozen, and validating them.

- gates: binary cross-entropy against the soft KVzip scores, summed over heads and layers, SGD with
  momentum 0.9 and lr 0.2, 1,000 random tokens per step, 1% warm-up and the step decay (x0.5 at 50%,
  x0.25 at 75%) of the reference recipe, which runs 5,000 steps;
- surrogates: ridge regression (alpha 1, as scikit-learn's default the reference uses) or a
  D→512→GELU→H_kv MLP with MSE, AdamW lr 5e-3, cosine schedule, gradient clipping at 1, batches of
  512, on 500 random token positions per text of about 1,000 tokens (the reference's sampling).

Both fits checkpoint every ``Checkpoints.every`` steps (parameters, optimiser and schedule state, the
sampler's random state and position, the losses so far): a training killed at any point and started
again with the same arguments resumes from its last checkpoint and ends with the same weights, bit for
bit, as one that ran through. Every ``validate_every`` steps the loss on held-out texts is recorded.

The validation figure is the overlap of the learned scorer's kept set with KVzip's (global
allocation: one threshold over all layers and heads) on held-out texts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvbench.methods.gated import SinkGate
from kvbench.methods.kvzap import Surrogate
from kvbench.training.targets import TextFeatures


def global_kept(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mask of the entries one global threshold keeps over ``scores (L, H, n)``."""
    flat = scores.flatten().float()
    keep = flat.numel() - round(ratio * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(0, flat.topk(keep).indices, True).view_as(scores)


def agreement(predicted: list[torch.Tensor], teacher: list[torch.Tensor], ratio: float) -> float:
    """Mean over texts of |kept ∩ teacher's kept| / |teacher's kept| under global allocation."""
    overlaps = []
    for pred, target in zip(predicted, teacher):
        kept, wanted = global_kept(pred, ratio), global_kept(target, ratio)
        overlaps.append(float((kept & wanted).sum()) / max(int(wanted.sum()), 1))
    return sum(overlaps) / len(overlaps)


@torch.no_grad()
def gate_scores(gates: list[SinkGate], hidden: torch.Tensor) -> torch.Tensor:
    return torch.stack([g(hidden[i].unsqueeze(0))[0] for i, g in enumerate(gates)])


@torch.no_grad()
def surrogate_scores(model: Surrogate, hidden: torch.Tensor) -> torch.Tensor:
    return torch.stack([model.layer(layer, hidden[k].unsqueeze(0))[0] for k, layer in enumerate(model.layer_indices)])


def lr_factor(step: int, steps: int) -> float:
    """The reference schedule: linear warm-up over the first 1%, then x0.5 at 50% and x0.25 at 75%."""
    if step < 0.01 * steps:
        return (step + 1) / max(0.01 * steps, 1)
    return 1.0 if step < 0.5 * steps else 0.5 if step < 0.75 * steps else 0.25


def gate_loss(gates: list[SinkGate], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE of each layer's gate against soft KVzip targets: mean over tokens, sum over heads and layers."""
    total = x.new_zeros(())
    for i, gate in enumerate(gates):
        pred = gate(x[i].unsqueeze(0))[0].clamp(1e-7, 1 - 1e-7)  # (H, n)
        total = total + F.binary_cross_entropy(pred, y[i].clamp(0, 1), reduction="none").mean(-1).sum()
    return total


class TrainingInterrupted(RuntimeError):
    """Raised by the ``stop_after`` hook: the process stops as if killed (no checkpoint written then)."""


@dataclass
class Checkpoints:
    """Where and how often a fit saves its state, and the hook tests use to stop it part-way."""

    path: Path | None = None  # None: no checkpoints
    every: int = 100
    stop_after: int | None = None  # stop (raise TrainingInterrupted) once this many steps ran in this call
    fingerprint: dict = field(default_factory=dict)  # what the state belongs to: a mismatch starts afresh

    def load(self, log=None) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=False)
        if state.get("fingerprint") != self._digest():
            if log:
                log(f"kvbench: {self.path} belongs to another training (data or recipe differ): starting afresh")
            return None
        return state

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({**state, "fingerprint": self._digest()}, tmp)
        tmp.replace(self.path)  # atomic: a kill while saving keeps the previous checkpoint

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FitLog:
    """What a fit reports: per-step training losses, (step, loss) on held-out texts, seconds spent."""

    losses: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


def _held_out_gate_loss(gates: list[SinkGate], held_out: list[TextFeatures]) -> float:
    with torch.no_grad():
        return sum(float(gate_loss(gates, f.hidden.float(), f.kvzip)) for f in held_out) / len(held_out)


def fit_gates(features: list[TextFeatures], config, steps: int = 5000, batch: int = 1000, lr: float = 0.2,
              seed: int = 0, progress: bool = True, held_out: list[TextFeatures] | None = None,
              validate_every: int = 100, checkpoints: Checkpoints | None = None,
              log=None) -> tuple[list[SinkGate], FitLog]:
    checkpoints = checkpoints or Checkpoints()
    torch.manual_seed(seed)
    kv_heads, group = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    gates = [SinkGate(config.hidden_size, kv_heads, group) for _ in range(features[0].hidden.shape[0])]
    params = [p for g in gates for p in g.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    x_all = torch.cat([f.hidden for f in features], dim=1)  # (L, N, d)
    y_all = torch.cat([f.kvzip for f in features], dim=2)  # (L, H, N)
    n = x_all.shape[1]
    generator = torch.Generator().manual_seed(seed)
    order, cursor, record, start = torch.randperm(n, generator=generator), 0, FitLog(), 0
    state = checkpoints.load(log)
    if state is not None:
        for gate, saved in zip(gates, state["gates"]):
            gate.load_state_dict(saved)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        order, cursor, start = state["order"], state["cursor"], state["step"]
        record = FitLog(state["losses"], state["validation"], state["seconds"], start)
        if log:
            log(f"kvbench: resuming the gates from step {start:,} of {steps:,} ({checkpoints.path})")
    bar = tqdm(range(start, steps), desc="gates", unit="step", file=sys.stderr, disable=not progress,
               initial=start, total=steps)
    clock, ran = time.perf_counter(), 0
    for step in bar:
        if checkpoints.stop_after is not None and ran >= checkpoints.stop_after:
            raise TrainingInterrupted(f"stopped after {ran} steps")
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        index = order[cursor:cursor + batch]
        cursor += batch
        loss = gate_loss(gates, x_all[:, index].float(), y_all[:, :, index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group_ in optimizer.param_groups:
            group_["lr"] = lr * lr_factor(step, steps)
        optimizer.step()
        record.losses.append(loss.item())
        ran += 1
        done = step + 1
        if held_out and (done % validate_every == 0 or done == steps):
            record.validation.append((done, _held_out_gate_loss(gates, held_out)))
            bar.set_postfix(loss=f"{record.losses[-1]:.3f}", val=f"{record.validation[-1][1]:.3f}")
        elif step % 50 == 0:
            bar.set_postfix(loss=f"{record.losses[-1]:.3f}")
        if done % checkpoints.every == 0 and done < steps:
            checkpoints.save({"gates": [g.state_dict() for g in gates], "optimizer": optimizer.state_dict(),
                              "generator": generator.get_state(), "order": order, "cursor": cursor, "step": done,
                              "losses": record.losses, "validation": record.validation,
                              "seconds": record.seconds + time.perf_counter() - clock})
    record.seconds += time.perf_counter() - clock
    for g in gates:
        g.eval().requires_grad_(False)
    return gates, record


def sample_positions(features: list[TextFeatures], per_text: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_text`` random token positions of every text: X ``(L, N, d)`` float32, y ``(L, N, H)``."""
    generator = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for f in features:
        index = torch.randperm(f.hidden.shape[1], generator=generator)[:per_text]
        xs.append(f.hidden[:, index].float())
        ys.append(f.plus[:, :, index].transpose(1, 2))
    return torch.cat(xs, dim=1), torch.cat(ys, dim=1)


def fit_linear(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, layer_indices: list[int] | None = None
               ) -> Surrogate:
    """Ridge regression per layer with an unpenalised intercept, solved exactly in float64.
    ``layer_indices``: the model layer each row of ``x`` belongs to (default: row i is layer i)."""
    layers, _, dim = x.shape
    model = Surrogate(dim, y.shape[-1], layers, layer_indices=layer_indices)
    for i in range(layers):
        xi, yi = x[i].double(), y[i].double()
        x_mean, y_mean = xi.mean(0), yi.mean(0)
        xc, yc = xi - x_mean, yi - y_mean
        weight = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(dim, dtype=xc.dtype), xc.T @ yc)  # (d, H)
        model.layers[i].weight.data = weight.T.float().contiguous()
        model.layers[i].bias.data = (y_mean - x_mean @ weight).float()
    return model.eval().requires_grad_(False)


def fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden_dim: int = 512, epochs: int = 15, lr: float = 5e-3,
            batch: int = 512, seed: int = 0, progress: bool = True,
            held_out: tuple[torch.Tensor, torch.Tensor] | None = None, validate_every: int = 100,
            checkpoints: Checkpoints | None = None, log=None, layer_indices: list[int] | None = None
            ) -> tuple[Surrogate, FitLog]:
    """All layers' MLPs trained side by side (batched matmuls), one shared schedule. ``held_out``:
    ``(x, y)`` shaped like the training pair, for the periodic validation MSE; ``layer_indices`` as
    in :func:`fit_linear`."""
    checkpoints = checkpoints or Checkpoints()
    torch.manual_seed(seed)
    layers, n, dim = x.shape
    model = Surrogate(dim, y.shape[-1], layers, hidden_dim, layer_indices)
    with torch.no_grad():  # start from the mean log score (about -8): far fewer steps to a useful fit
        for module, mean in zip(model.layers, y.mean(dim=1)):
            module[2].bias.copy_(mean)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    steps_per_epoch = max(n // batch, 1)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    generator = torch.Generator().manual_seed(seed)
    order, record, start = None, FitLog(), 0
    state = checkpoints.load(log)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        order, start = state["order"], state["step"]
        record = FitLog(state["losses"], state["validation"], state["seconds"], start)
        if log:
            log(f"kvbench: resuming the surrogate from step {start:,} of {total:,} ({checkpoints.path})")

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        w1 = torch.stack([m[0].weight for m in model.layers])  # (L, hidden, d)
        b1 = torch.stack([m[0].bias for m in model.layers])
        w2 = torch.stack([m[2].weight for m in model.layers])  # (L, H, hidden)
        b2 = torch.stack([m[2].bias for m in model.layers])
        h = F.gelu(torch.baddbmm(b1.unsqueeze(1), inputs, w1.transpose(1, 2)))
        return torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))

    bar = tqdm(total=total, initial=start, desc="kvzap mlp", unit="step", file=sys.stderr, disable=not progress)
    clock, ran = time.perf_counter(), 0
    for step in range(start, total):
        if checkpoints.stop_after is not None and ran >= checkpoints.stop_after:
            raise TrainingInterrupted(f"stopped after {ran} steps")
        s = step % steps_per_epoch
        if s == 0 or order is None:
            order = torch.randperm(n, generator=generator)
        index = order[s * batch:(s + 1) * batch]
        loss = F.mse_loss(forward(x[:, index]), y[:, index], reduction="none").mean(dim=(1, 2)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the loss sums over layers: each layer's MLP sees its own mean
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        record.losses.append(loss.item() / layers)
        ran += 1
        done = step + 1
        bar.update()
        if held_out is not None and (done % validate_every == 0 or done == total):
            with torch.no_grad():
                record.validation.append((done, float(F.mse_loss(forward(held_out[0]), held_out[1]))))
            bar.set_postfix(mse=f"{record.losses[-1]:.3f}", val=f"{record.validation[-1][1]:.3f}")
        elif s % 20 == 0:
            bar.set_postfix(mse=f"{record.losses[-1]:.3f}")
        if done % checkpoints.every == 0 and done < total:
            checkpoints.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                              "order": order, "step": done, "losses": record.losses,
                              "validation": record.validation,
                              "seconds": record.seconds + time.perf_counter() - clock})
    bar.close()
    record.seconds += time.perf_counter() - clock
    return model.eval().requires_grad_(False), record
