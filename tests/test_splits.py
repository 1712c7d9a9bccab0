"""Splits: grouped by patient, stratified by label, deterministic, order-independent."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe.train.splits import holdout_mask, kfold_assignments, stratification_key


def _data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.array([f"p{i // 2:04d}" for i in range(n)])  # two rows per patient
    labels = (rng.random(n) < 0.3).astype(int)
    ids = np.array([f"s{i:05d}" for i in range(n)])
    return ids, labels, patients


def test_no_patient_in_two_folds_and_balanced_labels():
    ids, y, pats = _data()
    folds = kfold_assignments(ids, y, pats, k=5, seed=1)
    for p in np.unique(pats):
        assert len(set(folds[pats == p])) == 1
    rates = [y[folds == f].mean() for f in range(5)]
    assert max(rates) - min(rates) < 0.1
    sizes = np.bincount(folds)
    assert sizes.min() > 0.15 * len(ids)


def test_order_independent_and_seeded():
    ids, y, pats = _data()
    a = kfold_assignments(ids, y, pats, k=4, seed=3)
    perm = np.random.default_rng(9).permutation(len(ids))
    b = kfold_assignments(ids[perm], y[perm], pats[perm], k=4, seed=3)
    assert (a[perm] == b).all()
    assert not (kfold_assignments(ids, y, pats, k=4, seed=4) == a).all()


def test_holdout_fraction():
    ids, y, pats = _data(1000)
    m = holdout_mask(ids, y, pats, fraction=0.2, seed=0)
    assert 0.17 < m.mean() < 0.23
    with pytest.raises(ValueError):
        holdout_mask(ids, y, fraction=1.5)


def test_holdout_fraction_above_half_is_honoured():
    # round(1/0.75) folds would hold out a third; above one half the complement must be held out
    ids, y, pats = _data(1000)
    m = holdout_mask(ids, y, pats, fraction=0.75, seed=0)
    assert 0.72 < m.mean() < 0.78
    held = set(np.asarray(pats)[m])
    assert not held & set(np.asarray(pats)[~m])  # still grouped by patient


def test_strata_for_regression_and_multilabel():
    y = np.random.default_rng(0).standard_normal(100)
    assert len(np.unique(stratification_key(y))) == 5
    ml = (np.random.default_rng(1).random((100, 3)) < 0.5).astype(float)
    assert stratification_key(ml).shape == (100,)


def test_too_many_folds():
    with pytest.raises(ValueError, match="cannot make 5 folds from 3 patients"):
        kfold_assignments(["a", "b", "c"], [0, 1, 0], k=5)


def test_holdout_fraction_zero_holds_out_nothing():
    # ingest.test_fraction: 0 (cross-validate every row) must not fail later in the splits
    ids, y, pats = _data(50)
    assert not holdout_mask(ids, y, pats, fraction=0.0).any()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        holdout_mask(ids, y, fraction=1.0)
