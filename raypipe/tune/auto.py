"""``raypipe train --set train.method=auto``: pick and ensemble fusion methods by k-fold CV on Ray.

1. The candidates (``train.auto.candidates``; default every registered method suited to the
   task, each with the train section's settings) are cross-validated on the same
   ``train.auto.folds`` folds (grouped, stratified) of the training split (every row not in
   the test split), one 1-CPU Ray task per (candidate, fold), with the same fold machinery as
   `raypipe compare` (:mod:`raypipe.tune.folds`): a fit trains on the other folds with the
   config's simulated missingness (``train.p_drop``), early-stops on a validation part of
   them, and predicts its held-out fold (out-of-fold predictions).
   With ``train.auto.tune_trials`` > 0 a Ray Tune search of each candidate's hyper-parameters
   on the same folds and with the same fold function comes first
   (:func:`raypipe.tune.search.search_candidates`); each candidate is then cross-validated
   with its best trial's values.
2. ``train.auto.time_limit`` (seconds, covering the search and the CV): fits still running then
   are cancelled; a candidate without every fold is skipped and listed as such.
3. A greedy weighted ensemble (:mod:`raypipe.fusion.ensemble`) over the candidates'
   out-of-fold predictions; it is scored on the same folds (for each fold, weights chosen on
   the other folds' predictions, so its score is not fitted to the fold it is scored on).
4. ``<run dir>/leaderboard.csv`` (metric mean ± std over folds, fit seconds, paired t-test
   against the best, searched params), ``auto_summary.json``, ``folds.parquet`` and, with a
   search, ``search.csv``.
5. The winner is refitted on the full training split with `raypipe train`'s own path (Ray
   Train V2) into the run directory (default ``<out_dir>/train/auto``); an ensemble's members
   are refitted each into ``members/<name>`` and saved together as one model
   (``model.pt`` + ``model_meta.json``) that `raypipe infer` and `raypipe report` use.

Deterministic: same config and seed, same folds, search trials, fits, leaderboard and choice
(the time limit aside: what finishes in time depends on the machine).

Public functions (stable; ``benchmarks/fusion_quality_auto.py`` uses them): :func:`candidates`,
:func:`cross_validate`, :func:`run_auto`, :func:`leaderboard_html`; the ensemble itself is
:mod:`raypipe.fusion.ensemble` (``greedy_ensemble``, ``combine``).
"""

from __future__ import annotations

import html
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe.config import Config, TrainConfig

log = logging.getLogger(__name__)

LEADERBOARD_FILE = "leaderboard.csv"
SUMMARY_FILE = "auto_summary.json"


@dataclass
class Candidate:
    label: str  # its row in the leaderboard
    method: str
    train_cfg: dict  # a TrainConfig dict


def candidates(cfg: Config, task: str) -> list[Candidate]:
    """The candidates of ``train.auto.candidates`` (validated), or every method suited to ``task``."""
    from raypipe.fusion.registry import REGISTRY

    base = cfg.train.model_dump(mode="json")
    base["method_args"] = {}
    specs = cfg.train.auto.candidates or [name for name, cls in REGISTRY.items() if task in cls.info.tasks]
    out: list[Candidate] = []
    seen: dict[str, int] = {}
    for spec in specs:
        overrides: dict[str, Any] = {}
        if isinstance(spec, dict):
            spec = dict(spec)
            name = spec.pop("method", None)
            if not name:
                raise ValueError(f"train.auto.candidates: {spec} has no 'method'")
            overrides = spec
        else:
            name = spec
        if name not in REGISTRY or name == "auto":
            raise ValueError(f"train.auto.candidates: unknown method {name!r}; registered: {', '.join(REGISTRY)}")
        if task not in REGISTRY[name].info.tasks:
            raise ValueError(f"train.auto.candidates: {name!r} does not support a {task} task")
        data = json.loads(json.dumps(base))
        for k, v in overrides.items():
            node, parts = data, k.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = v
        data["method"] = name
        tc = TrainConfig.model_validate(data)  # a wrong key fails here, before Ray starts
        label = name if not overrides else f"{name}[{','.join(f'{k}={v}' for k, v in sorted(overrides.items()))}]"
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}#{seen[label]}"
        out.append(Candidate(label, name, tc.model_dump(mode="json")))
    if not out:
        raise ValueError(f"no registered fusion method supports a {task} task")
    return out


def _binary_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic (average ranks for ties): equal to sklearn's, ~20x cheaper."""
    from scipy.stats import rankdata

    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _metric_fn(task: str, metric: str):
    """``score(y, probabilities)`` of one metric: what ensemble selection calls hundreds of times.

    The common metrics are computed directly (same values as ``compute_metrics``); the rest
    through ``compute_metrics``.
    """
    from raypipe.train.metrics import compute_metrics

    def score(y: np.ndarray, p: np.ndarray) -> float:
        p = np.asarray(p, np.float64)
        if task == "binary" and metric == "auroc":
            return _binary_auroc(y, p[:, -1])
        if task == "binary" and metric == "brier":
            return float(np.mean((p[:, -1] - np.asarray(y)) ** 2))
        if task == "multiclass" and metric == "accuracy":
            return float(np.mean(p.argmax(axis=1) == np.asarray(y).astype(int)))
        if task == "regression" and metric in ("r2", "mae"):
            yy, pred = np.asarray(y, np.float64), p.reshape(-1)
            if metric == "mae":
                return float(np.mean(np.abs(yy - pred)))
            ss_tot = float(np.sum((yy - yy.mean()) ** 2))
            return 1 - float(np.sum((yy - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
        return float(compute_metrics(task, y, p).get(metric, np.nan))

    return score


def cross_validate(cfg: Config, table, task: str, metric: str, higher: bool, out_dir: str) -> dict:
    """Steps 1-4 of the module docstring; returns the summary (the refit is :func:`run_auto`'s)."""
    import pandas as pd
    import ray
    from scipy.stats import ttest_rel

    from raypipe.fusion.ensemble import combine, greedy_ensemble
    from raypipe.runtime import init_ray
    from raypipe.train.splits import kfold_assignments
    from raypipe.train.trainer import assign_splits
    from raypipe.tune.folds import FitJob, n_outputs_for, run_fits, summarise, write_folds

    ac = cfg.train.auto
    t_start = time.perf_counter()
    cands = candidates(cfg, task)
    rows_cv = assign_splits(table, cfg) != "test"  # the full training split (train + val)
    sub = table.take(rows_cv)
    folds = kfold_assignments(sub.sample_id, sub.y, k=ac.folds, seed=cfg.run.seed)
    init_ray(cfg)
    os.makedirs(out_dir, exist_ok=True)
    write_folds(os.path.join(out_dir, "folds.parquet"), sub.sample_id, folds)
    data = (sub.x, sub.mask, sub.y, sub.sample_id, {m: list(s) for m, s in sub.shapes.items()})
    data_ref = ray.put(data)
    n_out = n_outputs_for(task, table.y)
    deadline = time.monotonic() + ac.time_limit if ac.time_limit else None
    searched: dict[str, dict] = {}
    search_seconds = 0.0
    if ac.tune_trials > 0:  # each candidate's hyper-parameters from a Tune search on these folds
        from raypipe.tune.search import apply_train_params, search_candidates

        t0 = time.perf_counter()
        searched = search_candidates(cfg, cands, data, folds, task, sub.modalities, metric, higher, n_out, out_dir,
                                     time_budget_s=ac.time_limit / 2 if ac.time_limit else None)
        search_seconds = time.perf_counter() - t0
        for c in cands:
            if searched[c.label]["params"]:
                c.train_cfg = apply_train_params(c.train_cfg, searched[c.label]["params"])
        log.info("auto: search done in %.1f s: %s", search_seconds, "; ".join(
            f"{c.label} {json.dumps(searched[c.label]['params'], default=str)}" for c in cands))
    jobs = [FitJob(c.label, c.method, f, c.train_cfg) for c in cands for f in range(ac.folds)]
    log.info("auto: %d candidates x %d folds = %d fits on %d rows (metric %s%s)", len(cands), ac.folds, len(jobs),
             len(sub), metric, f", time limit {ac.time_limit:g} s" if ac.time_limit else "")
    t0 = time.perf_counter()
    prepare_seconds = t0 - t_start - search_seconds
    results, unfinished, errors = run_fits(jobs, data_ref, folds, task, sub.modalities, cfg.run.seed,
                                           patterns=False, return_predictions=True, deadline=deadline,
                                           progress_bars=cfg.ray.progress_bars, desc="auto", n_outputs=n_out)
    seconds = time.perf_counter() - t0
    by_label: dict[str, dict[int, dict]] = {}
    for r in results:
        by_label.setdefault(r["method"], {})[r["fold"]] = r
    cut = {j.label for j in unfinished}
    complete, skipped = [], {}
    for c in cands:
        got = by_label.get(c.label, {})
        if c.label in errors:
            skipped[c.label] = f"failed: {errors[c.label]}"
        elif len(got) < ac.folds or c.label in cut:
            skipped[c.label] = f"time limit ({len(got)} of {ac.folds} folds finished in {ac.time_limit:g} s)"
        else:
            complete.append(c)
    if skipped:
        log.warning("auto: skipped %s", "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if not complete:
        raise RuntimeError(f"no candidate finished every fold (train.auto.time_limit={ac.time_limit}): "
                           f"{skipped}; raise the time limit or list fewer candidates")
    t_ens = time.perf_counter()
    score = _metric_fn(task, metric)
    per_fold: dict[str, np.ndarray] = {}
    oof: dict[str, np.ndarray] = {}
    fit_seconds: dict[str, float] = {}
    for c in complete:
        got = by_label[c.label]
        per_fold[c.label] = np.array([got[f].get(metric, np.nan) for f in range(ac.folds)], dtype=float)
        k = got[0]["oof"].shape[1]
        pred = np.zeros((len(sub), k), np.float64)
        for f in range(ac.folds):
            pred[folds == f] = got[f]["oof"]
        oof[c.label] = pred
        fit_seconds[c.label] = float(sum(got[f]["seconds"] for f in range(ac.folds)))
    labels = [c.label for c in complete]
    weights: dict[str, float] = {}
    if ac.ensemble_size > 0 and len(complete) >= 2:
        preds = [oof[l] for l in labels]
        fold_scores = []
        for f in range(ac.folds):  # weights from the other folds' predictions, scored on fold f
            tr, te = folds != f, folds == f
            w_f, _ = greedy_ensemble([p[tr] for p in preds], sub.y[tr], score, ac.ensemble_size, higher)
            fold_scores.append(score(sub.y[te], combine([p[te] for p in preds], w_f)))
        w, _ = greedy_ensemble(preds, sub.y, score, ac.ensemble_size, higher)
        weights = {l: float(v) for l, v in zip(labels, w) if v > 0}
        per_fold["ensemble"] = np.array(fold_scores, dtype=float)
        fit_seconds["ensemble"] = float(sum(fit_seconds[l] for l in weights))
    ensemble_seconds = time.perf_counter() - t_ens
    means = {l: summarise(v)[0] for l, v in per_fold.items()}
    key = (lambda l: means[l]) if higher else (lambda l: -means[l])
    order = sorted(per_fold, key=lambda l: (-key(l) if np.isfinite(means[l]) else np.inf,
                                            l == "ensemble", list(per_fold).index(l)))
    best = order[0]
    board = []
    for l in order:
        mean, std = summarise(per_fold[l])
        p = np.nan
        if l != best:
            a, b = per_fold[best], per_fold[l]
            p = float(ttest_rel(a, b).pvalue) if np.isfinite(a).all() and np.isfinite(b).all() else np.nan
        board.append({"rank": len(board) + 1, "candidate": l, f"{metric}_mean": mean, f"{metric}_std": std,
                      "fit_seconds": round(fit_seconds[l], 2), f"p_vs_{best}": p, "status": "ok",
                      "folds": json.dumps([None if not np.isfinite(v) else round(float(v), 6) for v in per_fold[l]]),
                      "members": ",".join(f"{m}:{weights[m]:.3f}" for m in weights) if l == "ensemble" else "",
                      "params": _params_text(searched.get(l))})
    for l, why in skipped.items():
        board.append({"rank": None, "candidate": l, f"{metric}_mean": np.nan, f"{metric}_std": np.nan,
                      "fit_seconds": np.nan, f"p_vs_{best}": np.nan, "status": f"skipped: {why}", "folds": "",
                      "members": "", "params": _params_text(searched.get(l))})
    df = pd.DataFrame(board)
    df.to_csv(os.path.join(out_dir, LEADERBOARD_FILE) + ".tmp", index=False)
    os.replace(os.path.join(out_dir, LEADERBOARD_FILE) + ".tmp", os.path.join(out_dir, LEADERBOARD_FILE))
    chosen = best
    if chosen == "ensemble" and len(weights) == 1:  # the ensemble is one model: that model
        chosen = next(iter(weights))
    summary = {"ok": True, "task": task, "metric": metric, "higher_is_better": higher, "folds": ac.folds,
               "rows": int(len(sub)), "candidates": [c.label for c in cands], "skipped": skipped, "best": best,
               "chosen": chosen, "ensemble_weights": weights, "cv_seconds": round(seconds, 1),
               "search_seconds": round(search_seconds, 1), "tune_trials": ac.tune_trials,
               "seconds": {"prepare": round(prepare_seconds, 2), "search": round(search_seconds, 2),
                           "fits": round(seconds, 2), "fits_summed": round(sum(r["seconds"] for r in results), 2),
                           "fits_cpu_summed": round(sum(r.get("cpu_seconds", 0.0) for r in results), 2),
                           "ensemble": round(ensemble_seconds, 2), "total": round(time.perf_counter() - t_start, 2)},
               "fit_cpu_seconds": {l: round(sum(r.get("cpu_seconds", 0.0) for r in by_label.get(l, {}).values()), 2)
                                   for l in [c.label for c in cands]},
               "search": {l: {k: v for k, v in d.items()} for l, d in searched.items()},
               "mean": {l: means[l] for l in order},
               "leaderboard": os.path.abspath(os.path.join(out_dir, LEADERBOARD_FILE))}
    summary["_candidates"] = {c.label: c for c in complete}
    return summary


def _params_text(found: dict | None) -> str:
    """A leaderboard cell: the searched hyper-parameters a candidate was cross-validated with."""
    if not found:
        return ""
    if not found.get("params"):
        return "search: no complete trial, own settings"
    return json.dumps(found["params"], sort_keys=True, default=str)


def _cfg_for(cfg: Config, cand, out: str) -> Config:
    tc = TrainConfig.model_validate({**cand.train_cfg, "out": out})
    return cfg.model_copy(update={"train": tc})


def run_auto(cfg: Config, refit: bool = True) -> dict:
    """`raypipe train` with ``train.method: auto``: cross-validate, ensemble, choose, refit; returns a summary."""
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.folds import resolve_metric

    table = read_embeddings(cfg.train_input, cfg.ingest.label_columns)  # input problems fail before Ray
    task, _ = infer_task(table.y, cfg.train.task)
    metric, higher = resolve_metric(cfg.train.auto.metric, task)
    candidates(cfg, task)  # a wrong candidate list too
    if cfg.train.auto.tune_trials:  # and a search auto cannot run
        from raypipe.tune.search import search_space

        if cfg.tune.search == "optuna":
            raise ValueError("train.auto.tune_trials searches with tune.search random or grid, not optuna")
        search_space(cfg)
    run_dir = cfg.train_dir("auto")
    summary = cross_validate(cfg, table, task, metric, higher, run_dir)
    cands = summary.pop("_candidates")
    result = {k: summary[k] for k in ("ok", "task", "metric", "best", "chosen", "skipped", "cv_seconds",
                                      "leaderboard")}
    if summary["tune_trials"]:
        result["search_seconds"] = summary["search_seconds"]
    result["run_dir"] = os.path.abspath(run_dir)
    if refit:
        t0 = time.perf_counter()
        if summary["chosen"] == "ensemble":
            final = _refit_ensemble(cfg, table, task, run_dir, summary["ensemble_weights"], cands)
        else:
            from raypipe.train.trainer import run_train

            final = run_train(_cfg_for(cfg, cands[summary["chosen"]], run_dir))
        summary["refit_seconds"] = round(time.perf_counter() - t0, 1)
        main = [k for k in final if k.startswith("test_")]
        result.update({k: final[k] for k in main})
        _annotate_metrics(run_dir, summary)
        result["refit_seconds"] = summary["refit_seconds"]
    with open(os.path.join(run_dir, SUMMARY_FILE), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    board = _printable(summary["leaderboard"], metric)
    if board:
        result["printed"] = board
    return result


def _printable(path: str, metric: str) -> str:
    import pandas as pd

    df = pd.read_csv(path)
    pcol = [c for c in df.columns if c.startswith("p_vs_")]
    shown = pd.DataFrame({"candidate": df["candidate"],
                          metric: [("" if pd.isna(m) else f"{m:.3f} ± {s:.3f}")
                                   for m, s in zip(df[f"{metric}_mean"], df[f"{metric}_std"])],
                          "fit s": df["fit_seconds"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}"),
                          pcol[0] if pcol else "p": (df[pcol[0]] if pcol else np.nan).map(
                              lambda v: "" if pd.isna(v) else f"{v:.3g}"),
                          "status": df["status"]})
    return "\n" + shown.to_string(index=False)


def _annotate_metrics(run_dir: str, summary: dict) -> None:
    """Add the auto choice to the refitted run's metrics.json (the report shows it)."""
    path = os.path.join(run_dir, "metrics.json")
    with open(path) as fh:
        doc = json.load(fh)
    doc["auto"] = {k: summary[k] for k in ("metric", "best", "chosen", "ensemble_weights", "skipped", "folds")}
    with open(path + ".tmp", "w") as fh:
        json.dump(doc, fh, indent=2, default=float)
    os.replace(path + ".tmp", path)


def _refit_ensemble(cfg: Config, table, task: str, run_dir: str, weights: dict[str, float], cands: dict) -> dict:
    """Refit each member on the full training split (`raypipe train`'s path), save them as one model, test it."""
    from raypipe.fusion.ensemble import EnsembleMethod, ensemble_meta, save_ensemble
    from raypipe.train import loop
    from raypipe.train.evaluate import evaluate_test
    from raypipe.train.metrics import main_metric_name
    from raypipe.train.trainer import (_write_test_predictions, assign_splits, imputation_projection, load_trained,
                                       run_train)

    members, metas, names, ws, fit = [], [], [], [], 0.0
    for label, w in weights.items():
        safe = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in label)
        mdir = os.path.join(run_dir, "members", safe)
        res = run_train(_cfg_for(cfg, cands[label], mdir))
        fit += float(res.get("fit_seconds") or 0)
        method, meta = load_trained(mdir)
        members.append(method)
        metas.append(meta)
        names.append(label)
        ws.append(w)
    ens = EnsembleMethod(members, ws, names)
    meta = ensemble_meta(metas, ws, names)
    save_ensemble(run_dir, ens, meta)
    top_dir = os.path.join(run_dir, "members", "".join(ch if ch.isalnum() or ch in "_-" else "_"
                                                        for ch in names[ens.top]))
    for f in ("split.parquet", "history.json"):
        if os.path.isfile(os.path.join(top_dir, f)):
            shutil.copy(os.path.join(top_dir, f), os.path.join(run_dir, f))
    split = assign_splits(table, cfg)
    test = table.take(split == "test")
    groups = {k: v for k, v in test.groups.items() if k in cfg.ingest.group_columns}
    test_metrics, natural = evaluate_test(loop.make_predict_fn(ens, task), test.x, test.mask, test.y, task,
                                          table.modalities, groups, seed=cfg.run.seed,
                                          gap_threshold=cfg.report.subgroup_gap_threshold)
    main = main_metric_name(task)
    doc = {"method": "ensemble", "task": task, "modalities": table.modalities, "main_metric": main,
           "n": {s: int((split == s).sum()) for s in ("train", "val", "test")}, "fit_seconds": fit,
           "members": {n: float(w) for n, w in zip(names, ens.weights.tolist())}, "test": test_metrics}
    with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
        json.dump(doc, fh, indent=2, default=float)
    _write_test_predictions(os.path.join(run_dir, "predictions_test.parquet"), test, natural)
    proj = imputation_projection(ens.top_member, test)
    if proj is not None:
        proj.to_parquet(os.path.join(run_dir, "projection.parquet"), index=False)
    from raypipe.config import dump_config

    with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
        fh.write(dump_config(cfg))
    return {"ok": True, f"test_{main}": test_metrics["natural"].get(main), "fit_seconds": round(fit, 1)}


# ----------------------------------------------------------------------------- report section
def leaderboard_html(run_dir: str) -> str:
    """The report's leaderboard section for a ``train.method=auto`` run ("" for any other run)."""
    path = os.path.join(run_dir, LEADERBOARD_FILE)
    if not os.path.isfile(path):
        return ""
    import pandas as pd

    df = pd.read_csv(path)
    summary = {}
    if os.path.isfile(os.path.join(run_dir, SUMMARY_FILE)):
        with open(os.path.join(run_dir, SUMMARY_FILE)) as fh:
            summary = json.load(fh)
    metric = summary.get("metric") or next(c[:-5] for c in df.columns if c.endswith("_mean"))
    cols = [c for c in df.columns if c != "folds"]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            text = "" if (isinstance(v, float) and np.isnan(v)) else (f"{v:.4g}" if isinstance(v, float) else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        style = " style='font-weight:bold'" if r["candidate"] == summary.get("chosen") else ""
        body.append(f"<tr{style}>{''.join(cells)}</tr>")
    skipped = summary.get("skipped") or {}
    note = (f"<p>Skipped: {html.escape('; '.join(f'{k} ({v})' for k, v in skipped.items()))}</p>"
            if skipped else "")
    return (f"<h2>Automatic method choice (train.method=auto)</h2><p>{html.escape(str(summary.get('folds', '?')))}"
            f"-fold cross-validation on the training split, metric <b>{html.escape(metric)}</b> (mean ± std over "
            f"folds, ddof=1; paired t-test against the best); chosen and refitted: "
            f"<b>{html.escape(str(summary.get('chosen', '?')))}</b>.</p>{note}"
            f"<table><tr>{head}</tr>{''.join(body)}</table>")
