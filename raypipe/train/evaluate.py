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


DEFAULT_RATES = tuple(r / 10 for r in range(10))


def evaluation_inputs(mask: np.ndarray, modalities: Sequence[str], seed: int = 0,
                      rates: Sequence[float] = DEFAULT_RATES) -> list[dict]:
    """Every prediction :func:`evaluate_test` makes, in its order: ``{"kind": "natural" | "pattern" | "rate",
    "name": pattern name or rate, "rows": row indices (None = every row), "mask": the mask to predict with,
    "id": the pass's identity}``. So the predictions can be made elsewhere (e.g. an ensemble's members in
    parallel) and handed back, each with its pass's ``id`` under ``"pass"`` (:func:`predict_inputs` adds it).

    ``id`` = (kind, name, seed, number of rows): predictions made for another seed (other simulated masks),
    other rates, other patterns or another test split do not carry the same identities."""
    n = len(mask)
    passes: list[dict] = [{"kind": "natural", "name": "natural", "rows": None, "mask": mask}]
    for pat in all_patterns(len(modalities)):
        want = np.array(pat)
        rows = np.all(mask[:, want], axis=1)  # samples that really have every modality of the pattern
        if rows.sum() < 2:
            continue
        passes.append({"kind": "pattern", "name": pattern_name(modalities, pat), "rows": np.flatnonzero(rows),
                       "mask": np.broadcast_to(want, (int(rows.sum()), len(modalities))).copy()})
    for r in rates:
        passes.append({"kind": "rate", "name": float(r), "rows": None,
                       "mask": simulate_missing(mask, r, seed + int(round(r * 100)))})
    for p in passes:
        p["id"] = (p["kind"], p["name"], int(seed), n if p["rows"] is None else int(len(p["rows"])))
    return passes


def predict_inputs(predict_fn: PredictFn, x: dict[str, np.ndarray], passes: Sequence[dict]) -> list[dict]:
    """``predict_fn``'s outputs for each of :func:`evaluation_inputs`' passes, each with the pass's identity
    under ``"pass"``."""
    return [{**_predict(predict_fn, x if p["rows"] is None else {m: v[p["rows"]] for m, v in x.items()},
                        p["mask"]), "pass": p["id"]}
            for p in passes]


def evaluate_test(predict_fn: PredictFn | None, x: dict[str, np.ndarray], mask: np.ndarray, y: np.ndarray, task: str,
                  modalities: Sequence[str], groups: dict[str, np.ndarray] | None = None, seed: int = 0,
                  rates: Sequence[float] = DEFAULT_RATES, gap_threshold: float = 0.05,
                  predictions: Sequence[dict] | None = None) -> tuple[dict, dict]:
    """Return (metrics dict for metrics.json["test"], natural-pattern prediction arrays).

    ``predictions``: the outputs for :func:`evaluation_inputs` ``(mask, modalities, seed, rates)``, in its
    order, made elsewhere, each carrying its pass's ``id`` under ``"pass"`` (as :func:`predict_inputs` gives
    them); a prediction made for another pass (another seed, rates, pattern or test split) raises ValueError.
    By default they are made here with ``predict_fn``."""
    passes = evaluation_inputs(mask, modalities, seed, rates)
    if predictions is None:
        predictions = predict_inputs(predict_fn, x, passes)
    if len(predictions) != len(passes):
        raise ValueError(f"{len(predictions)} predictions for {len(passes)} evaluation passes")
    for i, (p, out) in enumerate(zip(passes, predictions)):
        if out.get("pass") != p["id"]:
            raise ValueError(f"prediction {i} was made for evaluation pass {out.get('pass')}, expected {p['id']} "
                             f"(kind, name, seed, rows): make the predictions from evaluation_inputs with the same "
                             f"test mask, modalities, seed ({seed}) and rates as evaluate_test")
    predictions = [{k: v for k, v in out.items() if k != "pass"} for out in predictions]
    natural = predictions[0]
    result: dict = {"natural": {"n": int(len(y)), **M.compute_metrics(task, y, natural["probabilities"])}}
    patterns, curve = [], []
    for p, out in zip(passes[1:], predictions[1:]):
        if p["kind"] == "pattern":
            patterns.append({"pattern": p["name"], "n": int(len(p["rows"])),
                             **M.compute_metrics(task, y[p["rows"]], out["probabilities"])})
        else:
            curve.append({"rate": p["name"], **M.compute_metrics(task, y, out["probabilities"])})
    result["patterns"] = patterns
    result["missing_rate_curve"] = curve
    weights = {k[len("weight_"):]: v for k, v in natural.items() if k.startswith("weight_")}
    if weights:
        result["reliability_mean"] = {m: float(np.nanmean(w)) if len(w) else float("nan") for m, w in weights.items()}
    if groups:
        result["subgroups"] = subgroup_metrics(task, y, natural["probabilities"], groups, gap_threshold)
    return result, natural
