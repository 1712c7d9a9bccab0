"""Cross-modal alignment and retrieval metrics in pure torch / numpy (no Ray here).

A shared space for modality pairs (docs/retrieve.md): one projection head per
modality (two-layer MLP, output L2-normalised) and one learned temperature.
Training minimises the symmetric InfoNCE loss of CLIP (Radford et al. 2021) over
the samples of a batch that have *both* modalities of a pair: for projections
``a_i``, ``b_j`` and logit scale ``s = 1 / temperature``,

    L = 1/2 [ mean_i CE(s * a_i . b_*, i) + mean_j CE(s * b_j . a_*, j) ]

so each sample's own partner is the positive and every other sample in the batch a
negative. The logit scale is a parameter (stored as its log, clamped at 100 as in
CLIP so it cannot blow up). A pair list such as ``[("report", "ct")]`` says which
spaces are aligned; a modality in several pairs shares its head.

Metrics: the rank of the true partner among every candidate of the gallery
(1 = first; ties count against the query), Recall@k, median rank, mean
reciprocal rank.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: CLIP's cap on the logit scale (temperature >= 0.01)
MAX_LOGIT_SCALE = 100.0


def parse_pairs(pairs: Iterable[str] | Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """``["report:ct", ...]`` or ``[("report", "ct")]`` -> ``[("report", "ct"), ...]`` (checked, no duplicates)."""
    out: list[tuple[str, str]] = []
    for p in pairs:
        parts = p.split(":") if isinstance(p, str) else list(p)
        a, b = (str(parts[0]).strip(), str(parts[1]).strip()) if len(parts) == 2 else ("", "")
        if not a or not b or a == b:
            raise ValueError(f"a retrieval pair is two different modalities written A:B (e.g. report:ct), got {p!r}")
        if (a, b) not in out and (b, a) not in out:
            out.append((a, b))
    if not out:
        raise ValueError("no modality pairs to align (retrieve.pairs, e.g. [report:ct])")
    return out


class ProjectionHead(nn.Module):
    """Standardise -> Linear -> GELU -> Linear, L2-normalised: one modality's embedding into the shared space.

    The standardisation (``shift``, ``scale`` buffers: the training rows' per-feature mean and
    standard deviation, set by :meth:`set_standardisation`) puts embeddings of very different
    scales (an image model's features, a text model's) on one footing before the first layer.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))

    def set_standardisation(self, mean, std) -> None:
        self.shift.copy_(torch.as_tensor(np.asarray(mean, np.float32)))
        self.scale.copy_(torch.as_tensor(np.maximum(np.asarray(std, np.float32), 1e-6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((x.flatten(1) - self.shift) / self.scale), dim=-1)


class CrossModalAligner(nn.Module):
    """Projection heads for the modalities of ``pairs`` plus the learned (log) logit scale."""

    def __init__(self, in_dims: dict[str, int], pairs: Sequence[tuple[str, str]], dim: int = 64, hidden: int = 256,
                 temperature: float = 0.07):
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        mods = sorted({m for p in self.pairs for m in p})
        missing = [m for m in mods if m not in in_dims]
        if missing:
            raise ValueError(f"pair modalities {missing} are not in the embeddings table (it has {sorted(in_dims)})")
        self.heads = nn.ModuleDict({m: ProjectionHead(int(in_dims[m]), dim, hidden) for m in mods})
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature), dtype=torch.float32))

    @property
    def modalities(self) -> list[str]:
        return list(self.heads)

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def project(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return self.heads[modality](x)

    def forward(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss (what DDP wraps): :meth:`loss` without its statistics."""
        return self.loss(x, present)[0]

    def loss(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """Mean over pairs of the symmetric InfoNCE on the rows having both modalities.

        A pair with fewer than two such rows in the batch has no negatives and is skipped;
        if every pair is skipped the loss is a zero that still touches every parameter (DDP
        needs the same graph on every worker).
        """
        losses, stats = [], {}
        for a, b in self.pairs:
            both = present[a] & present[b]
            if int(both.sum()) < 2:
                continue
            za, zb = self.project(a, x[a][both]), self.project(b, x[b][both])
            loss = symmetric_info_nce(za, zb, self.logit_scale())
            losses.append(loss)
            stats[f"loss_{a}_{b}"] = float(loss.detach())
        if not losses:
            return sum(p.sum() for p in self.parameters()) * 0.0, stats
        return torch.stack(losses).mean(), stats


def symmetric_info_nce(za: torch.Tensor, zb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of row-aligned projections ``za``, ``zb`` (N, d); row i of each is a positive pair.

    The inputs are used as given (the heads normalise); logits are ``scale * za @ zb.T``.
    """
    logits = logit_scale * za @ zb.T
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ----------------------------------------------------------------------------- search and metrics
def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int, chunk: int = 4096,
                 gallery_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: (indices (Q, k), scores (Q, k)), best first; the reference for any index.

    Blocked float32 matrix products: ``chunk`` queries at a time against ``gallery_chunk`` gallery
    rows at a time (default: the whole gallery), keeping each block's top k, so the working memory
    is about 12 bytes x ``chunk`` x ``gallery_chunk`` whatever the gallery's size. Ties in score go
    to the lower row number.
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    k = min(k, len(gallery))
    g_step = gallery_chunk if gallery_chunk and gallery_chunk > 0 else max(1, len(gallery))
    idx = np.empty((len(queries), k), np.int64)
    sc = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk]
        cand_i, cand_s = [], []
        for g in range(0, len(gallery), g_step):
            scores = q @ gallery[g:g + g_step].T
            kk = min(k, scores.shape[1])
            cut = scores.shape[1] - kk
            part = np.argpartition(scores, cut, axis=1)[:, cut:]  # this block's kk best (unordered)
            cand_s.append(np.take_along_axis(scores, part, axis=1))
            cand_i.append(part + g)
            del scores
        part = np.concatenate(cand_i, axis=1)
        part_scores = np.concatenate(cand_s, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)[:, :k]  # by score, then by index: deterministic on ties
        idx[s:s + chunk] = np.take_along_axis(part, order, axis=1)
        sc[s:s + chunk] = np.take_along_axis(part_scores, order, axis=1)
    return idx, sc


def true_ranks(queries: np.ndarray, gallery: np.ndarray, true_index: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Rank (1-based) of gallery row ``true_index[i]`` for query ``i`` among every gallery row.

    Rank = number of gallery rows scoring at least as high as the true one (the true row
    included), so ties count against the query and a constant scorer gets the worst rank.
    """
    queries = np.asarray(queries, np.float32)
    gallery = np.asarray(gallery, np.float32)
    true_index = np.asarray(true_index, np.int64)
    ranks = np.empty(len(queries), np.int64)
    for s in range(0, len(queries), chunk):
        scores = queries[s:s + chunk] @ gallery.T
        own = scores[np.arange(len(scores)), true_index[s:s + chunk]]
        ranks[s:s + chunk] = (scores >= own[:, None]).sum(axis=1)
    return ranks


def ranks_from_hits(hits: np.ndarray, true_index: np.ndarray) -> np.ndarray:
    """Rank of the true row within each query's returned hit list (1-based), 0 where it is not among them."""
    hits = np.asarray(hits)
    found = hits == np.asarray(true_index)[:, None]
    return np.where(found.any(axis=1), found.argmax(axis=1) + 1, 0)


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k (share of queries whose partner ranks <= k), median rank and mean reciprocal rank.

    ``ranks``: 1-based; 0 means "not retrieved" (counts as a miss for every k and 0 in the MRR;
    the median rank is then undefined unless over half are found, and reported as NaN).
    """
    ranks = np.asarray(ranks, np.int64)
    if len(ranks) == 0:
        return {**{f"recall@{k}": float("nan") for k in ks}, "median_rank": float("nan"), "mrr": float("nan"), "n": 0}
    found = ranks > 0
    out = {f"recall@{k}": float(np.mean(found & (ranks <= k))) for k in ks}
    out["median_rank"] = float(np.median(ranks)) if found.all() else float("nan")
    out["mrr"] = float(np.mean(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0)))
    out["n"] = int(len(ranks))
    return out


def chance_metrics(gallery_size: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The same metrics for a random ranking of a gallery of ``gallery_size``: the chance line."""
    n = max(int(gallery_size), 1)
    out = {f"recall@{k}": min(k, n) / n for k in ks}
    out["median_rank"] = (n + 1) / 2
    out["mrr"] = float(np.sum(1.0 / np.arange(1, n + 1)) / n)
    return out
