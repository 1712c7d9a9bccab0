"""Metrics of METHOD.md section 3 (framework-free: numpy + scikit-learn).

Binary: AUROC, AUPRC, F1 at 0.5 and at the Youden threshold, Brier.
Multiclass: macro one-vs-rest AUROC, accuracy, macro F1. Multilabel: macro
AUROC over labels. Regression: R^2, sMAPE, MAE. ``probs`` is what the model's
prediction path returns: (N, 2) class probabilities for binary, (N, C) for
multiclass, (N, L) label probabilities for multilabel, (N, 1) values for
regression.
"""

from __future__ import annotations

import numpy as np

_MAIN = {"binary": "auroc", "multiclass": "auroc", "multilabel": "auroc", "regression": "r2"}


def main_metric_name(task: str) -> str:
    """The metric used for early stopping, checkpoint ranking and tuning (higher is better)."""
    return _MAIN[task]


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, score))


def binary_metrics(y: np.ndarray, p1: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, f1_score, roc_curve

    y = np.asarray(y).astype(int)
    out = {"auroc": _auroc(y, p1), "brier": float(np.mean((p1 - y) ** 2)),
           "f1": float(f1_score(y, p1 >= 0.5, zero_division=0))}
    if len(np.unique(y)) == 2:
        out["auprc"] = float(average_precision_score(y, p1))
        fpr, tpr, thr = roc_curve(y, p1)
        t = float(thr[np.argmax(tpr - fpr)])
        out["youden_threshold"] = min(t, 1.0)
        out["f1_youden"] = float(f1_score(y, p1 >= t, zero_division=0))
    else:
        out.update({"auprc": float("nan"), "youden_threshold": float("nan"), "f1_youden": float("nan")})
    return out


def multiclass_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y).astype(int)
    pred = probs.argmax(axis=1)
    out = {"accuracy": float(accuracy_score(y, pred)), "macro_f1": float(f1_score(y, pred, average="macro"))}
    present = np.unique(y)
    if len(present) < 2:
        out["auroc"] = float("nan")
    elif len(present) == probs.shape[1]:
        out["auroc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    else:  # classes absent from this split: average one-vs-rest AUROC over the present ones
        out["auroc"] = float(np.mean([_auroc(y == c, probs[:, c]) for c in present]))
    return out


def multilabel_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    aucs = [_auroc(y[:, j], probs[:, j]) for j in range(y.shape[1])]
    valid = [a for a in aucs if not np.isnan(a)]
    return {"auroc": float(np.mean(valid)) if valid else float("nan"),
            **{f"auroc_label{j}": a for j, a in enumerate(aucs)}}


def regression_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y = np.asarray(y, np.float64)
    pred = np.asarray(pred, np.float64).reshape(-1)
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    denom = np.abs(y) + np.abs(pred)
    smape = float(np.mean(np.where(denom > 0, 2 * np.abs(pred - y) / np.where(denom > 0, denom, 1), 0)) * 100)
    return {"r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "smape": smape,
            "mae": float(np.mean(np.abs(y - pred)))}


def compute_metrics(task: str, y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """All METHOD.md metrics for ``task`` on labels ``y`` and model outputs ``probs``."""
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y)
    if len(y) == 0:
        return {}
    if task == "binary":
        return binary_metrics(y, probs[:, -1] if probs.ndim == 2 else probs)
    if task == "multiclass":
        return multiclass_metrics(y, probs)
    if task == "multilabel":
        return multilabel_metrics(y, probs)
    if task == "regression":
        return regression_metrics(y, probs)
    raise ValueError(f"unknown task {task!r}")


# ----------------------------------------------------------------------------- AUROC intervals
def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeLong's structural components of one or more score columns.

    Returns (auc (K,), v10 (K, n_pos), v01 (K, n_neg)): v10[k, i] is the share of negatives that
    positive i outranks under score k (ties count one half), v01[k, j] the share of positives
    that outrank negative j. The AUROC is the mean of either.
    """
    y = np.asarray(y).astype(int)
    s = np.atleast_2d(np.asarray(scores, np.float64))
    pos, neg = s[:, y == 1], s[:, y == 0]
    # (K, n_pos, n_neg) comparison kernel; fine for test splits of a few thousand samples
    psi = (pos[:, :, None] > neg[:, None, :]).astype(np.float64) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    v10, v01 = psi.mean(axis=2), psi.mean(axis=1)
    return v10.mean(axis=1), v10, v01


def auroc_ci(y: np.ndarray, score: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """AUROC with its DeLong (1988) standard error and a normal ``level`` interval (clipped to [0, 1]).

    Returns {"auroc", "se", "lo", "hi", "n", "n_pos", "method": "delong"}; nan when a class is absent.
    """
    from scipy.stats import norm

    y = np.asarray(y).astype(int)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out = {"n": int(len(y)), "n_pos": n_pos, "method": "delong"}
    if n_pos < 2 or n_neg < 2:
        return {**out, "auroc": float("nan"), "se": float("nan"), "lo": float("nan"), "hi": float("nan")}
    auc, v10, v01 = _delong_components(y, score)
    var = np.var(v10[0], ddof=1) / n_pos + np.var(v01[0], ddof=1) / n_neg
    se = float(np.sqrt(var))
    z = float(norm.ppf(0.5 + level / 2))
    a = float(auc[0])
    return {**out, "auroc": a, "se": se, "lo": max(0.0, a - z * se), "hi": min(1.0, a + z * se)}


def auroc_difference(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Paired DeLong comparison of two scores on the same samples: AUROC(a) - AUROC(b).

    Returns {"diff", "se", "lo", "hi", "p"} (two-sided p of the normal test of no difference).
    """
    from scipy.stats import norm

    y = np.asarray(y).astype(int)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos < 2 or n_neg < 2:
        nan = float("nan")
        return {"diff": nan, "se": nan, "lo": nan, "hi": nan, "p": nan}
    auc, v10, v01 = _delong_components(y, np.stack([score_a, score_b]))
    cov = np.cov(v10, ddof=1) / n_pos + np.cov(v01, ddof=1) / n_neg
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    se = float(np.sqrt(max(var, 0.0)))
    z = float(norm.ppf(0.5 + level / 2))
    p = float(2 * norm.sf(abs(diff) / se)) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {"diff": diff, "se": se, "lo": diff - z * se, "hi": diff + z * se, "p": p}


def auroc_ci_hanley_mcneil(auc: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Approximate ``level`` interval of an AUROC from its value and class counts alone
    (Hanley & McNeil 1982), for tables that keep no per-sample scores."""
    from scipy.stats import norm

    if n_pos < 1 or n_neg < 1 or not np.isfinite(auc):
        return float("nan"), float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    half = float(norm.ppf(0.5 + level / 2)) * float(np.sqrt(max(var, 0.0)))
    return max(0.0, auc - half), min(1.0, auc + half)
