"""Hybrid fusion: early and late fusion in one model, mixed by weights that see the availability.

The survey (the multi-modal learning review in the project's seeds) defines hybrid fusion as
combining elements of early (feature-level) and late (decision-level) fusion. Here:

- early part: a joint head on the concatenated encodings, ``p_0 = g_0([h_1; ...; h_M])``
  (the ``concat`` baseline's decision);
- late part: one decision per modality, ``p_m = g_m(h_m)`` (the ``late`` baseline's heads);
- combination: ``p = sum_k w_k p_k`` over the joint decision and the decisions of the
  modalities *present*, with ``w = softmax(gate(mask))`` restricted to those sources. The gate
  is a small MLP of the availability mask, so the mix is learned per missing-data pattern
  (e.g. trust the joint decision when everything is there, a unimodal one when the joint
  head sees mostly absent slots). ``gate="constant"`` is the ablation: one learned logit per
  source, renormalised over the present ones, so the ratio between two present sources never
  depends on what else is missing.

Loss: the task loss of the mixture plus ``aux_weight`` times the mean, per sample, of the
task losses of its available sources (the joint head and each present modality's head), so
every decision maker learns on its own and the gate cannot starve one of gradient.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from raypipe.fusion.base import FusionMethod, MethodInfo, ModalitySpec, mlp, per_sample_loss, probabilities


def mixture_logits(p: torch.Tensor, task: str) -> torch.Tensor:
    """Logits whose ``probabilities`` are ``p`` (the mixed decision), for the task loss and metrics."""
    if task in ("binary", "multiclass"):
        return p.clamp_min(1e-7).log()
    if task == "multilabel":
        return torch.logit(p.clamp(1e-6, 1 - 1e-6))
    return p


class HybridFusion(FusionMethod):
    info = MethodInfo("hybrid", "hybrid",
                      description="joint (early) + per-modality (late) decisions, mask-conditioned learned mix")

    def __init__(self, specs: Sequence[ModalitySpec], task: str, n_outputs: int, hidden_dim: int = 128,
                 aux_weight: float = 1.0, gate: str = "mask"):
        super().__init__(specs, task, n_outputs, hidden_dim)
        if gate not in ("mask", "constant"):
            raise ValueError(f"hybrid: gate must be 'mask' or 'constant', got {gate!r}")
        if aux_weight < 0:
            raise ValueError(f"hybrid: aux_weight must be >= 0, got {aux_weight}")
        m, d = len(self.modalities), hidden_dim
        self.aux_weight, self.gate_kind = aux_weight, gate
        self.joint = mlp(m * d, d, n_outputs)
        self.heads = nn.ModuleDict({name: mlp(d, d, n_outputs) for name in self.modalities})
        if gate == "mask":
            self.gate = nn.Sequential(nn.Linear(m, d), nn.ReLU(), nn.Linear(d, m + 1))
        else:
            self.gate_logits = nn.Parameter(torch.zeros(m + 1))

    def source_logits(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """[joint, modality 1, ..., modality M] decisions as logits, each (B, K)."""
        hs = self.encode(x, mask)
        return [self.joint(torch.cat(hs, dim=1))] + [self.heads[m](h) for m, h in zip(self.modalities, hs)]

    def combination_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, 1 + M) mixing weights: the joint source first; exactly 0 for absent modalities."""
        sources = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        if self.gate_kind == "mask":
            scores = self.gate(mask.to(self.gate[0].weight.dtype))
        else:
            scores = self.gate_logits.unsqueeze(0).expand(mask.shape[0], -1)
        return scores.float().masked_fill(~sources, float("-inf")).softmax(dim=1)

    def mix(self, logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """sum_k w_k p_k: (B, K) probabilities (values for regression)."""
        probs = torch.stack([probabilities(lg.float(), self.task) for lg in logits], dim=1)  # (B, 1 + M, K)
        return (weights.unsqueeze(-1) * probs).sum(dim=1)

    def forward(self, batch: dict, full_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x, mask, y = batch["x"], batch["mask"], batch.get("y")
        logits = self.source_logits(x, mask)
        w = self.combination_weights(mask)
        out = {"logits": mixture_logits(self.mix(logits, w), self.task)}
        if y is None:
            return out
        mixed = per_sample_loss(out["logits"], y, self.task).mean()
        sources = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1).to(torch.float32)
        each = torch.stack([per_sample_loss(lg.float(), y, self.task) for lg in logits], dim=1)  # (B, 1 + M)
        aux = ((each * sources).sum(dim=1) / sources.sum(dim=1)).mean()
        out["loss"] = mixed + self.aux_weight * aux
        out["loss_mixture"] = mixed.detach()
        out["loss_sources"] = aux.detach()
        return out

    @torch.no_grad()
    def predict_with_trace(self, x, mask):
        logits = self.source_logits(x, mask)
        w = self.combination_weights(mask)
        out = {"probabilities": self.mix(logits, w)}
        for i, m in enumerate(self.modalities):
            out[f"prob_{m}"] = probabilities(logits[i + 1], self.task)
            out[f"weight_{m}"] = w[:, i + 1]  # the joint decision's weight is 1 - sum of these
        return out
