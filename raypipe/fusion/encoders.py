"""Modality-specific encoders e_m (METHOD 1.1): MLP for pooled vectors, LSTM for sequences."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class VectorEncoder(nn.Module):
    """MLP for a pooled image/text embedding: (B, d) -> (B, D)."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1):
        super().__init__()
        hidden = max(d_out, min(256, d_in))
        self.net = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SequenceEncoder(nn.Module):
    """MedFuse-style 2-layer LSTM for an EHR sequence: (B, T, F) -> (B, D) via a projection."""

    def __init__(self, n_features: int, d_out: int, hidden: int = 256, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, num_layers=layers, batch_first=True, dropout=dropout)
        self.proj = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
