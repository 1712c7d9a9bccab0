"""The contract every fusion method follows, and the task-generic pieces they share.

A method is an ``nn.Module`` built for a list of :class:`ModalitySpec`. Batches
are dicts ``{"x": {modality: Tensor}, "mask": BoolTensor (B, M), "y": Tensor}``
where ``mask[:, i]`` says modality ``i`` is present (what the model may see).

Interface (the generic loop in ``raypipe.train.loop`` calls only these):

``forward(batch, full_mask=None) -> dict``
    Training step: returns at least ``"loss"`` (scalar) and ``"logits"``.
    ``full_mask`` is the availability before missing-pattern simulation, so
    OmniFuse knows which positions have a known truth. Called through DDP.
``predict_with_trace(x, mask) -> dict``
    ``"probabilities"`` (B, K) plus, where the method has them, ``"prob_<m>"``,
    ``"weight_<m>"`` (label-free reliability) and ``"imputed_<m>"``.
Hooks (no-ops by default; a method overrides what it needs):
``on_epoch_start(ctx)``, ``on_after_backward(ctx)``, ``on_epoch_end(ctx)``
    ``ctx`` is a :class:`raypipe.train.loop.HookContext`: the epoch number,
    ``all_reduce`` (identity locally, a sum over workers under DDP) and
    callables that iterate the worker's training / validation batches.
``extra_state() / load_extra_state(state)``
    Non-parameter state that must survive a checkpoint (the lazy subset, blend weights).
``early_stop_hold() -> bool``
    True while the method asks the loop not to stop early yet (a part of it still converging, e.g.
    OmniFuse's ``imp_patience``); False by default. Honoured by ``loop.fit_batches`` and the Ray Train worker.
"""

from __future__ import annotations

import contextlib

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModalitySpec:
    """A modality's name and per-sample input shape: (d,) pooled vector or (T, F) sequence."""

    name: str
    shape: tuple[int, ...]

    @property
    def is_sequence(self) -> bool:
        return len(self.shape) == 2


@dataclass(frozen=True)
class MethodInfo:
    """Metadata a method carries (fusilli-style), used by the registry to list and filter."""

    name: str
    fusion_type: str  # early | intermediate | late | attention | tensor | training-strategy | imputation
    hooks: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("binary", "multiclass", "multilabel", "regression")
    description: str = ""


# ----------------------------------------------------------------------------- task helpers
def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Unreduced task loss (B,): CE for binary/multiclass, mean BCE over labels, squared error."""
    if task in ("binary", "multiclass"):
        return F.cross_entropy(logits, y.long(), reduction="none")
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(dim=1)
    if task == "regression":
        return (logits.squeeze(-1) - y.float()) ** 2
    raise ValueError(f"unknown task {task!r}")


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Model outputs as probabilities (classification) or values (regression, (B, 1))."""
    if task in ("binary", "multiclass"):
        return logits.softmax(dim=-1)
    if task == "multilabel":
        return torch.sigmoid(logits)
    return logits


def true_value_probability(logits: torch.Tensor, y: torch.Tensor, task: str, var_y: float = 1.0) -> torch.Tensor:
    """q = the probability the model gives the true value (METHOD 1.3), shape (B,).

    multiclass/binary: p[y]; multilabel: mean over labels of p(true value);
    regression: exp(-(yhat - y)^2 / var_y).
    """
    if task in ("binary", "multiclass"):
        return logits.softmax(-1).gather(1, y.long().view(-1, 1)).squeeze(1)
    if task == "multilabel":
        p = torch.sigmoid(logits)
        yf = y.float()
        return (yf * p + (1 - yf) * (1 - p)).mean(dim=1)
    return torch.exp(-((logits.squeeze(-1) - y.float()) ** 2) / max(var_y, 1e-8))


def predicted_target(logits: torch.Tensor, task: str) -> torch.Tensor:
    """The model's own prediction in the form of a label (for label-free reliability weights)."""
    if task in ("binary", "multiclass"):
        return logits.argmax(-1)
    if task == "multilabel":
        return (torch.sigmoid(logits) >= 0.5).float()
    return logits.squeeze(-1)


def down_weighting(q: torch.Tensor, beta: float) -> torch.Tensor:
    """DWFuse factor (METHOD 1.3): w_m = [prod_{n != m} (1 - q_n)]^(beta / (M - 1)); q: (B, M)."""
    m = q.shape[1]
    one_minus = (1 - q).clamp_min(0.0)
    # product over the others without dividing (robust when some 1 - q_n = 0)
    prods = []
    for i in range(m):
        others = torch.cat([one_minus[:, :i], one_minus[:, i + 1:]], dim=1)
        prods.append(others.prod(dim=1))
    prod = torch.stack(prods, dim=1)
    return prod.clamp_min(0.0) ** (beta / max(m - 1, 1))


def nonempty_subsets(m: int) -> list[tuple[int, ...]]:
    """All 2^m - 1 non-empty subsets of range(m), as sorted index tuples (small first)."""
    return [s for k in range(1, m + 1) for s in itertools.combinations(range(m), k)]


# ----------------------------------------------------------------------------- base class
class FusionMethod(nn.Module):
    """Base class: encoders keyed by modality, the task, and default (no-op) hooks."""

    info: MethodInfo = MethodInfo("base", "none")

    def __init__(self, specs: Sequence[ModalitySpec], task: str, n_outputs: int, hidden_dim: int = 128):
        super().__init__()
        from raypipe.fusion.encoders import build_encoders

        if len(specs) < 2:
            raise ValueError(f"fusion needs at least 2 modalities, got {[s.name for s in specs]}")
        if task not in self.info.tasks:
            raise ValueError(f"method {self.info.name!r} does not support task {task!r} "
                             f"(supports {', '.join(self.info.tasks)})")
        self.specs = list(specs)
        self.modalities = [s.name for s in specs]
        self.task = task
        self.n_outputs = n_outputs
        self.hidden_dim = hidden_dim
        self.encoders = build_encoders(self.specs, hidden_dim)
        self.register_buffer("var_y", torch.tensor(1.0))

    #: what an absent modality's encoder sees (METHOD 1.1): "mean" = the all-zero input in the
    #: encoder's standardised space (the training mean, the project's choice); "zero_input" = the
    #: paper's e_m(0), the raw all-zero vector pushed through the standardisation like any input.
    #: Sequence (LSTM) encoders have no standardisation: both are the raw zeros there.
    absent_fill: str = "mean"

    # -- encoding
    def encode(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """h_m per modality; a missing modality is the encoder applied to zeros (METHOD 1.1)."""
        from raypipe.fusion.encoders import VectorEncoder

        hs = []
        for i, m in enumerate(self.modalities):
            xi = x[m]
            present = mask[:, i]
            keep = present.view(-1, *([1] * (xi.dim() - 1))).to(xi.dtype)
            enc = self.encoders[m]
            if self.absent_fill == "zero_input" and isinstance(enc, VectorEncoder):
                z = enc.norm(xi * keep, present)  # running statistics from the present rows only
                nm = enc.norm  # MaskedStandardize: raw zeros in its standardised space
                z0 = (-nm.mean / torch.sqrt(nm.var + nm.eps)).clamp(-nm.clip, nm.clip).to(z.dtype)
                z = torch.where(present.unsqueeze(-1), z, z0.unsqueeze(0).expand_as(z))
                hs.append(enc.net(z))
            else:
                hs.append(enc(xi * keep, present))
        return hs

    @contextlib.contextmanager
    def encoders_in_eval(self):
        """The encoders in eval mode inside the block (no dropout noise, no update of their running
        input statistics), each back in its own mode after it."""
        modes = [e.training for e in self.encoders.values()]
        self.encoders.eval()
        try:
            yield
        finally:
            for e, mode in zip(self.encoders.values(), modes):
                e.train(mode)

    @torch.no_grad()
    def encode_reference(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """h_m as a fixed target: encoders in eval mode (no dropout noise in the target, no update
        of the running input statistics from a second pass over the same batch), detached."""
        with self.encoders_in_eval():
            return self.encode(x, mask)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_loss(logits, y, self.task).mean()

    # -- prediction
    def predict_logits(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        return self.forward({"x": x, "mask": mask, "y": None}, full_mask=None)["logits"]

    @torch.no_grad()
    def predict_with_trace(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probabilities": probabilities(self.predict_logits(x, mask), self.task)}

    # -- hooks
    def on_epoch_start(self, ctx) -> None:  # noqa: D401 - hook
        pass

    def on_after_backward(self, ctx) -> None:
        pass

    def on_epoch_end(self, ctx) -> dict[str, Any] | None:
        return None

    def early_stop_hold(self) -> bool:
        return False

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def set_label_variance(self, var_y: float) -> None:
        """Training-label variance (regression confidence, METHOD 1.3)."""
        self.var_y.fill_(float(var_y))


def mlp(d_in: int, d_hidden: int, d_out: int, dropout: float = 0.1) -> nn.Sequential:
    """Two fully connected layers, the head shape used throughout (METHOD: 'g_m (2 FC layers)')."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))
