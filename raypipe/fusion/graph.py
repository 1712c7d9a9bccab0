"""Graph-based fusion: message passing over a per-sample graph whose nodes are the modalities present.

The survey (the multi-modal learning review in the project's seeds) describes graph-based
fusion as nodes for modalities and edges for their relationships. Here each sample is its
own small graph: one node per *available* modality, state ``h_m + t_m`` (encoding plus a
learned modality-type embedding), edges between every pair of present nodes (self-loops
included). A missing modality removes its node: its state is zero, no edge reaches or leaves
it, and the readout skips it, so no fill-in value exists anywhere.

Layer (GATv2-style attention, Brody et al. 2022, with a learned bias per edge type):

    e_ij^k = a_k . LeakyReLU(W_dst h_i + W_src h_j)_k + b^k[type(i), type(j)]
    alpha_ij^k = softmax over the present j of e_ij^k          (k = attention head)
    h_i <- LayerNorm(h_i + W_o ELU(concat_k sum_j alpha_ij^k (W_src h_j)_k))

``layers`` such layers, then attention pooling over the present nodes (its weights are the
per-modality ``weight_<m>``) and the task head.

Why a per-sample modality graph, not a population graph (patients as nodes, edges from
similarity as in population-graph GCNs): the model stays inductive. A new patient at
inference is a new small graph, predicted alone by an actor of ``raypipe infer`` without
the training cohort and without re-running message passing over it, and a prediction never
depends on who else is in the batch or the table. A population graph (kNN over the
embeddings or shared covariates, transductive or with neighbour sampling at inference) is a
documented extension (docs/fusion.md), not built.

Dense implementation, no torch-geometric: the graphs have M <= ~8 nodes and are complete
over the present nodes, so a masked (B, heads, M, M) attention is the same computation as a
sparse GATv2Conv on a batched edge list, without building edge lists per batch, identical on
CPU and GPU and inside DDP, and without a dependency on every Ray worker (torch-geometric
2.8.1 would install beside torch 2.13 CPU; it earns its place for a population graph).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raypipe.fusion.base import FusionMethod, MethodInfo, ModalitySpec, mlp, probabilities


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax over the ``allowed`` entries along ``dim`` (others exactly 0); all-zero where none is."""
    any_allowed = allowed.any(dim=dim, keepdim=True)
    safe = allowed | ~any_allowed  # a row with nothing allowed: softmax over all, then zeroed (no NaN)
    return scores.masked_fill(~safe, float("-inf")).softmax(dim=dim) * any_allowed.to(scores.dtype)


class ModalityGraphLayer(nn.Module):
    """One round of attention message passing between the present modality nodes."""

    def __init__(self, dim: int, n_types: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.heads, self.head_dim = heads, dim // heads
        self.src = nn.Linear(dim, dim)
        self.dst = nn.Linear(dim, dim)
        self.att = nn.Parameter(torch.randn(heads, self.head_dim) * (1.0 / self.head_dim ** 0.5))
        self.edge_bias = nn.Parameter(torch.zeros(heads, n_types, n_types))  # learned per edge type (i <- j)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: (B, M, D) node states, present: (B, M) -> (new states, attention (B, heads, M, M))."""
        b, m, _ = h.shape
        src = self.src(h).view(b, m, self.heads, self.head_dim)
        dst = self.dst(h).view(b, m, self.heads, self.head_dim)
        pair = F.leaky_relu(dst.unsqueeze(2) + src.unsqueeze(1), 0.2)  # (B, i, j, heads, dh)
        scores = (pair * self.att).sum(-1).permute(0, 3, 1, 2) + self.edge_bias  # (B, heads, i, j)
        edges = (present.unsqueeze(2) & present.unsqueeze(1)).unsqueeze(1)  # both ends present
        alpha = masked_softmax(scores.float(), edges.expand_as(scores), dim=-1)
        msg = torch.einsum("bkij,bjkd->bikd", alpha.to(src.dtype), src).reshape(b, m, -1)
        new = self.norm(h + self.dropout(self.out(F.elu(msg))))
        return new * present.unsqueeze(-1).to(new.dtype), alpha


class GraphFusion(FusionMethod):
    info = MethodInfo("graph", "graph",
                      description="attention message passing over a per-sample graph of the present modalities")

    def __init__(self, specs: Sequence[ModalitySpec], task: str, n_outputs: int, hidden_dim: int = 128,
                 layers: int = 2, heads: int = 4):
        super().__init__(specs, task, n_outputs, hidden_dim)
        if layers < 1:
            raise ValueError(f"graph: layers must be >= 1, got {layers}")
        m, d = len(self.modalities), hidden_dim
        self.node_type = nn.Parameter(torch.randn(m, d) * 0.02)
        self.layers = nn.ModuleList(ModalityGraphLayer(d, m, heads) for _ in range(layers))
        self.pool_key = nn.Linear(d, d)
        self.pool_query = nn.Linear(d, 1, bias=False)
        self.head = mlp(d, d, n_outputs)

    def propagate(self, x: dict[str, torch.Tensor], mask: torch.Tensor):
        """(pooled (B, D), readout weights (B, M), per-layer attention [(B, heads, M, M)])."""
        keep = mask.unsqueeze(-1)
        h = torch.stack(self.encode(x, mask), dim=1) + self.node_type
        h = h * keep.to(h.dtype)  # an absent modality has no node: nothing of e_m(0) remains
        attention = []
        for layer in self.layers:
            h, a = layer(h, mask)
            attention.append(a)
        scores = self.pool_query(torch.tanh(self.pool_key(h))).squeeze(-1).float()
        w = masked_softmax(scores, mask, dim=1)
        return (w.unsqueeze(-1).to(h.dtype) * h).sum(dim=1), w, attention

    def forward(self, batch: dict, full_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pooled, _, _ = self.propagate(batch["x"], batch["mask"])
        logits = self.head(pooled)
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out

    @torch.no_grad()
    def predict_with_trace(self, x, mask):
        pooled, w, _ = self.propagate(x, mask)
        out = {"probabilities": probabilities(self.head(pooled), self.task)}
        for i, m in enumerate(self.modalities):
            out[f"weight_{m}"] = w[:, i]
        return out
