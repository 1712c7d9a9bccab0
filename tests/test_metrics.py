"""METHOD section 3 metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raypipe.train.metrics import compute_metrics, main_metric_name


def test_binary_by_hand():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    out = compute_metrics("binary", y, np.stack([1 - p1, p1], 1))
    # positive/negative pairs: (0.35 > 0.1), (0.35 < 0.4), (0.8 > both) -> 3 of 4
    assert out["auroc"] == pytest.approx(0.75)
    # ranking 0.8(+), 0.4(-), 0.35(+), 0.1(-): AP = 1/2 * (1/1 + 2/3)
    assert out["auprc"] == pytest.approx((1 + 2 / 3) / 2)
    assert out["brier"] == pytest.approx(np.mean((p1 - y) ** 2))
    # at 0.5 only 0.8 is positive: precision 1, recall 0.5 -> F1 2/3
    assert out["f1"] == pytest.approx(2 / 3)
    # Youden: threshold 0.35 gives tpr 1, fpr 0.5 (J = 0.5) and 0.8 gives tpr .5, fpr 0 (J = .5): first max
    assert out["f1_youden"] in (pytest.approx(2 / 3), pytest.approx(0.8))
    assert main_metric_name("binary") == "auroc"


def test_binary_youden_threshold_separates():
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.05, 0.1, 0.2, 0.3, 0.35, 0.4])  # perfectly ranked, all below 0.5
    out = compute_metrics("binary", y, p1)
    assert out["auroc"] == 1.0 and out["f1"] == 0.0
    assert out["youden_threshold"] == pytest.approx(0.3) and out["f1_youden"] == 1.0


def test_binary_single_class_is_nan():
    out = compute_metrics("binary", np.zeros(4), np.full(4, 0.3))
    assert math.isnan(out["auroc"]) and math.isnan(out["auprc"])


def test_multiclass_by_hand():
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    out = compute_metrics("multiclass", y, probs)
    assert out["accuracy"] == pytest.approx(0.75)  # the third sample is predicted 1
    # per class F1: c0 1, c1 (P 1/2, R 1) 2/3, c2 (P 1, R 1/2) 2/3
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    # OvR AUROC: c0 1; c1: positive 0.5 vs negatives .2 .6 .1 -> 2/3; c2: positives .3 .8 vs .1 .3 -> (0.5 + 1 + 1 + 1)/4
    assert out["auroc"] == pytest.approx((1 + 2 / 3 + 3.5 / 4) / 3)


def test_multilabel_macro_auroc():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.1, 0.6], [0.8, 0.3], [0.3, 0.4]])
    out = compute_metrics("multilabel", y, probs)
    # label 0 ranked perfectly (1.0); label 1: positives .6 .3 vs negatives .2 .4 -> 2 of 4 pairs... (.6>.2,.6>.4,.3>.2)
    assert out["auroc_label0"] == 1.0 and out["auroc_label1"] == pytest.approx(0.75)
    assert out["auroc"] == pytest.approx(0.875)


def test_regression_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.5, 2.0, 2.0, 5.0])
    out = compute_metrics("regression", y, pred.reshape(-1, 1))
    assert out["mae"] == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    assert out["r2"] == pytest.approx(1 - (0.25 + 0 + 1 + 1) / 5.0)
    smape = np.mean([2 * 0.5 / 2.5, 0.0, 2 * 1 / 5, 2 * 1 / 9]) * 100
    assert out["smape"] == pytest.approx(smape)
    assert main_metric_name("regression") == "r2"


def test_auroc_ci_delong_by_hand():
    from raypipe.train.metrics import auroc_ci

    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    out = auroc_ci(y, p1)
    # positives beat [1/2, 1] of the negatives, negatives are beaten by [1, 1/2] of the positives:
    # var = var([.5, 1], ddof=1)/2 + var([1, .5], ddof=1)/2 = 0.125/2 + 0.125/2
    assert out["auroc"] == pytest.approx(0.75) and out["se"] == pytest.approx(math.sqrt(0.125))
    assert out["lo"] == pytest.approx(max(0.0, 0.75 - 1.959964 * math.sqrt(0.125)), abs=1e-6)
    assert out["hi"] == 1.0 and out["method"] == "delong" and out["n"] == 4
    assert math.isnan(auroc_ci(np.array([0, 0, 0, 1]), p1)["se"])  # one positive: no variance estimate


def test_auroc_difference_paired_by_hand():
    from raypipe.train.metrics import auroc_difference

    y = np.array([0, 0, 1, 1])
    a = np.array([0.1, 0.4, 0.35, 0.8])  # AUROC 0.75
    b = np.array([0.1, 0.2, 0.35, 0.8])  # AUROC 1
    out = auroc_difference(y, a, b)
    # component differences: positives [-.5, 0], negatives [0, -.5] -> var = .125/2 + .125/2
    assert out["diff"] == pytest.approx(-0.25) and out["se"] == pytest.approx(math.sqrt(0.125))
    assert out["p"] == pytest.approx(0.4795, abs=1e-3)  # 2 * (1 - Phi(0.25 / 0.3536))
    same = auroc_difference(y, a, a)
    assert same["diff"] == 0 and same["se"] == 0 and same["p"] == 1.0


def test_delong_agrees_with_hanley_mcneil_and_covers():
    """Binormal scores (true AUROC Phi(1/sqrt(2)) = 0.760): the two independent variance formulas agree,
    and the 95 % interval covers the true value in about 95 % of repeated draws."""
    from scipy.stats import norm

    from raypipe.train.metrics import auroc_ci, auroc_ci_hanley_mcneil

    true = norm.cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(0)
    covered = 0
    for r in range(200):
        y = np.r_[np.zeros(150), np.ones(100)].astype(int)
        s = rng.standard_normal(250) + y
        out = auroc_ci(y, s)
        covered += out["lo"] <= true <= out["hi"]
        if r == 0:
            lo, hi = auroc_ci_hanley_mcneil(out["auroc"], 100, 150)
            assert (hi - lo) == pytest.approx(out["hi"] - out["lo"], rel=0.15)
    assert 0.90 <= covered / 200 <= 0.99


def _fake_run(path, labels, p1, masks, patterns):
    import json
    import os

    import pandas as pd

    os.makedirs(path, exist_ok=True)
    json.dump({"method": "m", "task": "binary", "main_metric": "auroc", "modalities": list(masks),
               "n": {"test": len(labels)}, "test": {"natural": {"n": len(labels)}, "patterns": patterns}},
              open(os.path.join(path, "metrics.json"), "w"))
    pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(len(labels))], "label": labels,
                  "probabilities": [np.array([1 - p, p], np.float32) for p in p1],
                  **{f"mask_{m}": v for m, v in masks.items()}}).to_parquet(os.path.join(path, "predictions_test.parquet"))
    return str(path)


def test_headline_says_plainly_when_fusion_loses_to_a_single_modality(tmp_path):
    from raypipe.report.html import headline_lines, headline_numbers

    y = np.array([0, 0, 1, 1] * 10)
    fused = np.array([0.1, 0.4, 0.35, 0.8] * 10)  # AUROC 0.75
    other = np.array([0.1, 0.2, 0.35, 0.8] * 10)  # AUROC 1.0
    masks = {"ct": np.ones(40, bool), "pet": np.r_[np.ones(20, bool), np.zeros(20, bool)]}
    pats = [{"pattern": "ct", "n": 40, "auroc": 0.9}, {"pattern": "pet", "n": 20, "auroc": 0.6},
            {"pattern": "ct+pet", "n": 20, "auroc": 0.7}]
    h = headline_numbers({"omnifuse": _fake_run(tmp_path / "a", y, fused, masks, pats),
                          "concat": _fake_run(tmp_path / "b", y, other, masks, pats)})
    assert h["methods"]["omnifuse"]["auroc"] == pytest.approx(0.75)
    assert h["comparisons"]["concat"]["diff"] == pytest.approx(-0.25)
    s = h["single"]["omnifuse"]
    assert s["modality"] == "ct" and s["n"] == 40 and s["fused"]["auroc"] == pytest.approx(0.75)
    text = "\n".join(headline_lines(h))
    assert "fused omnifuse scores BELOW ct alone (0.750 vs 0.900" in text
    assert "fused concat scores BELOW" not in text  # concat (AUROC 1.0) beats ct alone (0.9)
    assert "95% CI" in text and "DeLong" in text
    assert "omnifuse is significantly WORSE" in text  # 40 samples, difference -0.25 with se 0.056
    assert "interval is" in text  # 40 test samples: wider than 0.05, and said so
    # a fused model at least as good as the modality alone: no NOTE
    pats_low = [{"pattern": "ct", "n": 40, "auroc": 0.7}]
    h2 = headline_numbers({"omnifuse": _fake_run(tmp_path / "c", y, fused, masks, pats_low)})
    assert "NOTE" not in "\n".join(headline_lines(h2))
