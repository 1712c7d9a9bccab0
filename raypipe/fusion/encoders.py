"""Modality-specific encoders e_m (METHOD 1.1): MLP for pooled vectors, LSTM for sequences."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class MaskedStandardize(nn.Module):
    """Per-feature standardisation with running statistics of the *present* samples only.

    Foundation-model embeddings come at very different scales (a ResNet's pooled features vs a
    MiniLM's); a per-sample LayerNorm would erase signal carried by a sample's overall level,
    and batch statistics would be polluted by the zeros of absent modalities. Training updates
    the running mean/variance from present rows (momentum 0.1), then every row is standardised
    with the running values (clipped at 10 standard deviations), so training and inference see
    the same transform; absent rows become exactly zero.
    """

    def __init__(self, d: int, momentum: float = 0.1, eps: float = 1e-4, clip: float = 10.0):
        super().__init__()
        self.momentum, self.eps, self.clip = momentum, eps, clip
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("var", torch.ones(d))
        self.register_buffer("seen", torch.tensor(False))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            rows = x if present is None else x[present]
            if rows.shape[0] >= 2:
                with torch.no_grad():
                    m, v = rows.mean(0), rows.var(0, unbiased=False)
                    if not bool(self.seen):
                        self.mean.copy_(m)
                        self.var.copy_(v)
                        self.seen.fill_(True)
                    else:
                        self.mean.lerp_(m, self.momentum)
                        self.var.lerp_(v, self.momentum)
        z = ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)
        if present is not None:
            # an absent modality is the all-zero input *in standardised space* (the training mean):
            # raw zeros would land tens of standard deviations away for features of small spread
            z = z * present.to(z.dtype).unsqueeze(-1)
        return z

    @torch.no_grad()
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """The standardisation with the current running statistics, never updating them.

        For targets in the standardised space (the MVAE's reconstructions), computed after the
        training forward pass has already updated the statistics from this batch once.
        """
        return ((x - self.mean) / torch.sqrt(self.var + self.eps)).clamp(-self.clip, self.clip)


def reconstruction_target(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, n) the space a generative model reconstructs modality input ``x`` in, detached.

    A pooled vector: its standardised form (the vector encoder's own input statistics, so
    embeddings of very different scales weigh alike). A sequence (EHR, already normalised by
    ingest): the flattened (T * F) values.
    """
    norm = getattr(encoder, "norm", None)
    if isinstance(norm, MaskedStandardize):
        return norm.transform(x).detach()
    return x.detach().flatten(1)


class VectorEncoder(nn.Module):
    """MLP for a pooled image/text embedding: (B, d) -> (B, D), on standardised inputs."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1):
        super().__init__()
        hidden = max(d_out, min(256, d_in))
        self.norm = MaskedStandardize(d_in)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.norm(x, present))


class SequenceEncoder(nn.Module):
    """MedFuse-style 2-layer LSTM for an EHR sequence: (B, T, F) -> (B, D) via a projection."""

    def __init__(self, n_features: int, d_out: int, hidden: int = 256, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.proj = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.proj(out[:, -1])


def build_encoders(specs: Sequence, d_out: int) -> nn.ModuleDict:
    """One encoder per modality, keyed by name (TorchMultimodal's ModuleDict pattern)."""
    enc = {}
    for s in specs:
        if len(s.shape) == 2:
            enc[s.name] = SequenceEncoder(s.shape[1], d_out, hidden=min(256, 4 * d_out))
        elif len(s.shape) == 1:
            enc[s.name] = VectorEncoder(s.shape[0], d_out)
        else:
            raise ValueError(f"modality {s.name}: unsupported embedding shape {s.shape} (use (d,) or (T, F))")
    return nn.ModuleDict(enc)
