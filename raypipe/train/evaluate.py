"""Test-split evaluation of a trained fusion model (framework-free, METHOD.md section 1.6 and 3).

(a) natural missingness, (b) every one of the 2^M - 1 modality patterns (each
sample expanded to the pattern, keeping only modalities it really has -- a
sample that lacks a modality of the pattern is left out of that pattern),
(c) the curve over simulated missing rates 0..90 %, plus the bias assessment
per subgroup (largest gap and equalised-odds difference) and the mean
label-free reliability weight per modality.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import numpy as np

from raypipe.train import metrics as M

PredictFn = Callable[[dict[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]


def pattern_name(modalities: Sequence[str], present: Sequence[bool]) -> str:
    return "+".join(m for m, p in zip(modalities, present) if p)


def all_patterns(n_modalities: int) -> list[tuple[bool, ...]]:
    """Every non-empty subset of the modalities, smallest first."""
    pats = [p for p in itertools.product([False, True], repeat=n_modalities) if any(p)]
    return sorted(pats, key=lambda p: (sum(p), [not v for v in p]))


def _predict(predict_fn: PredictFn, x: dict[str, np.ndarray], mask: np.ndarray, batch_size: int = 4096):
    if len(mask) == 0:  # no rows (e.g. ingest.test_fraction 0: no test split): the outputs' empty shapes
        one = predict_fn({m: np.zeros((1,) + v.shape[1:], np.float32) for m, v in x.items()},
                         np.ones((1, mask.shape[1]), bool))
        return {k: np.asarray(v)[:0] for k, v in one.items()}
    outs: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(mask), batch_size):
        part = predict_fn({m: v[i:i + batch_size] for m, v in x.items()}, mask[i:i + batch_size])
        for k, v in part.items():
            outs.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in outs.items()}


def simulate_missing(mask: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Drop each available modality with probability ``rate``, keeping at least one per sample."""
    rng = np.random.default_rng(seed)
    out = mask & (rng.random(mask.shape) >= rate)
    empty = ~out.any(axis=1)
    for i in np.flatnonzero(empty):  # restore one of the sample's own modalities at random
        out[i, rng.choice(np.flatnonzero(mask[i]))] = True
    return out


def subgroup_metrics(task: str, y: np.ndarray, probs: np.ndarray, groups: dict[str, np.ndarray],
                     threshold: float, min_size: int = 5) -> dict:
    """Per group column: metrics per group, the largest gap of the main metric, equalised odds."""
    out = {}
    main = M.main_metric_name(task)
    for col, values in groups.items():
        rows = []
        for g in sorted(set(values.tolist())):
            sel = values == g
            if sel.sum() < min_size:
                continue
            r = {"group": g, "n": int(sel.sum())}
            r.update(M.compute_metrics(task, y[sel], probs[sel]))
            if task == "binary":
                pred = probs[sel][:, 1] >= 0.5
                ys = y[sel].astype(bool)
                r["tpr"] = float(pred[ys].mean()) if ys.any() else float("nan")
                r["fpr"] = float(pred[~ys].mean()) if (~ys).any() else float("nan")
            rows.append(r)
        vals = [r.get(main, np.nan) for r in rows if not np.isnan(r.get(main, np.nan))]
        gap = float(max(vals) - min(vals)) if len(vals) >= 2 else float("nan")
        eod = float("nan")
        if task == "binary" and len(rows) >= 2:
            tprs = [r["tpr"] for r in rows if not np.isnan(r["tpr"])]
            fprs = [r["fpr"] for r in rows if not np.isnan(r["fpr"])]
            if tprs and fprs:
                eod = float(max(max(tprs) - min(tprs), max(fprs) - min(fprs)))
        flagged = bool((not np.isnan(gap) and gap > threshold) or (not np.isnan(eod) and eod > threshold))
        out[col] = {"groups": rows, "max_gap": gap, "equalized_odds_difference": eod, "flagged": flagged}
    return out


def evaluate_test(predict_fn: PredictFn, x: dict[str, np.ndarray], mask: np.ndarray, y: np.ndarray, task: str,
                  modalities: Sequence[str], groups: dict[str, np.ndarray] | None = None, seed: int = 0,
                  rates: Sequence[float] = tuple(r / 10 for r in range(10)), gap_threshold: float = 0.05) -> tuple[dict, dict]:
    """Return (metrics dict for metrics.json["test"], natural-pattern prediction arrays)."""
    natural = _predict(predict_fn, x, mask)
    result: dict = {"natural": {"n": int(len(y)), **M.compute_metrics(task, y, natural["probabilities"])}}
    patterns = []
    for pat in all_patterns(len(modalities)):
        want = np.array(pat)
        rows = np.all(mask[:, want], axis=1)  # samples that really have every modality of the pattern
        if rows.sum() < 2:
            continue
        pmask = np.broadcast_to(want, (int(rows.sum()), len(modalities))).copy()
        sub = {m: v[rows] for m, v in x.items()}
        out = _predict(predict_fn, sub, pmask)
        patterns.append({"pattern": pattern_name(modalities, pat), "n": int(rows.sum()),
                         **M.compute_metrics(task, y[rows], out["probabilities"])})
    result["patterns"] = patterns
    curve = []
    for r in rates:
        cm = simulate_missing(mask, r, seed + int(round(r * 100)))
        out = _predict(predict_fn, x, cm)
        curve.append({"rate": float(r), **M.compute_metrics(task, y, out["probabilities"])})
    result["missing_rate_curve"] = curve
    weights = {k[len("weight_"):]: v for k, v in natural.items() if k.startswith("weight_")}
    if weights:
        result["reliability_mean"] = {m: float(np.nanmean(w)) if len(w) else float("nan") for m, w in weights.items()}
    if groups:
        result["subgroups"] = subgroup_metrics(task, y, natural["probabilities"], groups, gap_threshold)
    return result, natural
