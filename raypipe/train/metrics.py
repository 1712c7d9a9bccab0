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
