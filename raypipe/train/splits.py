"""Patient-grouped, label-stratified splits and folds (no patient in two parts).

Pure functions over arrays; deterministic in ``seed`` and independent of row
order (rows are ordered by id before splitting).
"""

from __future__ import annotations

import numpy as np


def stratification_key(labels: np.ndarray, bins: int = 5) -> np.ndarray:
    """Integer strata: classes as they are; continuous targets by quantile bin; multilabel by pattern."""
    y = np.asarray(labels)
    if y.ndim == 2:  # multilabel: the label pattern (rare patterns merge into one stratum)
        keys = np.array(["".join("1" if v > 0.5 else "0" for v in row) for row in y])
        uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
        inv = np.where(counts[inv] < 2, -1, inv)
        return np.unique(inv, return_inverse=True)[1]
    if y.dtype.kind == "f" and not np.all(np.isin(y[~np.isnan(y)], [0.0, 1.0])) and len(np.unique(y)) > 20:
        edges = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
        return np.digitize(y, edges)
    return np.unique(y, return_inverse=True)[1]


def kfold_assignments(sample_ids, labels, groups=None, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index 0..k-1 per row: stratified by label, grouped by ``groups`` (default: the sample id)."""
    from sklearn.model_selection import StratifiedGroupKFold

    ids = np.asarray(sample_ids).astype(str)
    groups = ids if groups is None else np.asarray(groups).astype(str)
    n_groups = len(np.unique(groups))
    if k < 2 or k > n_groups:
        raise ValueError(f"cannot make {k} folds from {n_groups} patients")
    order = np.lexsort((ids, groups))  # row order must not change the answer
    strata = stratification_key(np.asarray(labels)[order])
    folds = np.empty(len(ids), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for f, (_, test_idx) in enumerate(splitter.split(np.zeros(len(ids)), strata, groups[order])):
        folds[order[test_idx]] = f
    return folds


def holdout_mask(sample_ids, labels, groups=None, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask of a held-out part of about ``fraction`` of the patients (grouped, stratified).

    ``fraction`` 0 holds out nothing (every entry False): e.g. ``ingest.test_fraction: 0``.
    """
    if fraction == 0:
        return np.zeros(len(np.asarray(sample_ids)), dtype=bool)
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction > 0.5:  # one fold of round(1/fraction) folds cannot exceed half: hold out all but one
        return ~holdout_mask(sample_ids, labels, groups, fraction=1.0 - fraction, seed=seed)
    k = max(2, int(round(1.0 / fraction)))
    return kfold_assignments(sample_ids, labels, groups, k=k, seed=seed) == 0
