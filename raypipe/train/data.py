"""In-memory batches and missing-pattern simulation (framework-free; METHOD 1.6).

Training: each time a sample is drawn, with probability ``p_drop`` a uniformly chosen
non-empty *proper* subset of its available modalities is dropped, so at least one
modality stays. The model then sees ``mask`` while ``full_mask`` keeps the truth,
which is what OmniFuse's forward imputation loss is computed against.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch


def _drop_options(available: tuple[bool, ...]) -> list[np.ndarray]:
    idx = [i for i, a in enumerate(available) if a]
    opts = []
    for k in range(1, len(idx)):  # non-empty, proper
        for combo in itertools.combinations(idx, k):
            opts.append(np.array(combo))
    return opts


def simulate_missing(mask: np.ndarray | torch.Tensor, p_drop: float, rng: np.random.Generator):
    """Return a copy of ``mask`` (B, M) with simulated missingness (never drops every modality)."""
    is_torch = isinstance(mask, torch.Tensor)
    m = mask.cpu().numpy() if is_torch else np.asarray(mask)
    out = m.copy()
    cache: dict[tuple[bool, ...], list[np.ndarray]] = {}
    draw = rng.random(len(m)) < p_drop
    for i in np.flatnonzero(draw):
        key = tuple(bool(v) for v in m[i])
        opts = cache.setdefault(key, _drop_options(key))
        if not opts:  # a single available modality: nothing may be dropped
            continue
        out[i, opts[rng.integers(len(opts))]] = False
    if is_torch:
        return torch.as_tensor(out, device=mask.device)
    return out


def tensor_batches(x: dict[str, np.ndarray], mask: np.ndarray, y: np.ndarray, task: str, batch_size: int,
                   shuffle: bool = False, seed: int = 0, device=None) -> Iterator[dict]:
    """Batches of the fusion format {"x": {m: T}, "mask": T, "y": T} from in-memory arrays (on ``device``)."""
    n = len(mask)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    y_dtype = torch.long if task == "multiclass" else torch.float32
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        yield {"x": {m: torch.as_tensor(v[idx], dtype=torch.float32, device=device) for m, v in x.items()},
               "mask": torch.as_tensor(mask[idx], dtype=torch.bool, device=device),
               "y": torch.as_tensor(y[idx], dtype=y_dtype, device=device)}
