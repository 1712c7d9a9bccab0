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
   The model to refit is chosen by ``train.auto.select`` (:func:`choose_model`; default
   ``ensemble_1se``: the ensemble unless the best single candidate beats it by more than one
   standard error).
4. ``<run dir>/leaderboard.csv`` (metric mean ± std over folds, fit seconds, paired t-test
   against the best, searched params), ``auto_summary.json``, ``folds.parquet`` and, with a
   search, ``search.csv``.
5. What is saved is set by ``train.auto.refit`` (:func:`refit_mode`; default ``bag``, from
   :class:`raypipe.config.AutoConfig`). ``bag``: no refit; the CV's fold models of the chosen
   candidates (kept in the object store by :func:`raypipe.tune.folds.run_fits`) are saved as one
   ensemble into the run directory (default ``<out_dir>/train/auto``), weight w_c / k on each of
   candidate c's k fold models (:func:`_save_bag`). ``full``: the winner is refitted on the full
   training split (its train part, split by the candidate's own ``val_fraction``; early stopping on
   its val part) into the run directory, the runner chosen from the chosen candidates' own train
   settings (:func:`refit_runner`): where every one trains on 1 CPU worker, as 1-CPU Ray tasks
   repeating the CV fits' own loop (:func:`raypipe.train.loop.fit`: constant learning rate, no cosine
   schedule, what the CV scores measured; an ensemble's members all at once); where any needs
   ``num_workers`` > 1 or a GPU, through `raypipe train`'s path (Ray Train V2, with its cosine
   learning-rate schedule), one after another. The two runners therefore give different models
   from the same candidate. A refitted ensemble's members go each into ``members/<name>``. Either
   way the result is one model (``model.pt`` + ``model_meta.json``) that `raypipe infer` and
   `raypipe report` use. What an earlier model left in the run directory is removed first
   (:func:`_clear_model_outputs`: a refitted ensemble's ``members/``, ``history.json``,
   ``projection.parquet``, ...), so the report never shows another model's curve or projection.

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
import typing
from dataclasses import dataclass
from typing import Any

import numpy as np

from raypipe import console
from raypipe.config import AutoConfig, Config, TrainConfig

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


#: how the model is chosen from the CV scores (:func:`choose_model`)
SELECT_RULES = ("best", "ensemble_1se", "simplest_1se")
#: the rule where ``train.auto.select`` is not set (:class:`raypipe.config.AutoConfig`'s default, read from there):
#: chosen by a rule stated before measuring (ensemble_1se met issue 18's criterion in as many of the 9 conditions
#: of benchmarks/fusion_quality_auto.py as best, 8, with a mean held-out AUROC at least as high, 0.9021 vs 0.9005;
#: benchmarks/RESULTS.md)
DEFAULT_SELECT = AutoConfig.model_fields["select"].default


def _within_one_se(a: np.ndarray, b: np.ndarray, sign: float) -> bool:
    """Is ``b``'s mean at most one standard error below ``a``'s (SE of the per-fold paired differences)?"""
    d = sign * (np.asarray(a, float) - np.asarray(b, float))
    d = d[np.isfinite(d)]
    if not len(d):
        return False
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) <= se + 1e-12


def choose_model(per_fold: dict[str, np.ndarray], higher: bool, rule: str = "best",
                 complexity: dict[str, float] | None = None) -> str:
    """The model to refit, from each candidate's per-fold CV scores (the ensemble's under ``"ensemble"``;
    the labels in candidate order, which breaks remaining ties).

    - ``best``: the highest mean (lowest for a lower-is-better metric); a tie goes to the single method.
    - ``ensemble_1se``: the ensemble when its mean is no more than one standard error below the best single
      candidate's (SE: std, ddof=1, of the per-fold paired differences / sqrt(folds)), else that candidate:
      differences within one SE among near-tied candidates are selection noise, and the ensemble averages
      them (the lower-variance choice).
    - ``simplest_1se``: Breiman's one-standard-error rule: of the single candidates within one SE (paired)
      of the best single one, the one with the smallest ``complexity`` (e.g. trainable parameters).
    """
    if rule not in SELECT_RULES:
        raise ValueError(f"select rule {rule!r}: one of {', '.join(SELECT_RULES)}")
    labels = list(per_fold)
    sign = 1.0 if higher else -1.0
    mean = {l: float(np.nanmean(v)) if np.isfinite(v).any() else np.nan for l, v in per_fold.items()}

    def ranked(pool):
        return sorted(pool, key=lambda l: (-sign * mean[l] if np.isfinite(mean[l]) else np.inf, l == "ensemble",
                                           labels.index(l)))

    best = ranked(labels)[0]
    singles = [l for l in labels if l != "ensemble"]
    if rule == "best" or not singles:
        return best
    top = ranked(singles)[0]
    if rule == "ensemble_1se":
        ens = per_fold.get("ensemble")
        return "ensemble" if ens is not None and _within_one_se(per_fold[top], ens, sign) else top
    if complexity is None:
        raise ValueError("select rule simplest_1se needs each candidate's complexity")
    near = [l for l in ranked(singles) if _within_one_se(per_fold[top], per_fold[l], sign)]
    return min(near, key=lambda l: (complexity[l], near.index(l)))


def parameter_counts(cands: list[Candidate], modalities: list[str], shapes: dict, task: str,
                     n_outputs: int) -> dict[str, int]:
    """Trainable parameters of each candidate's model (``simplest_1se``'s complexity)."""
    from raypipe.fusion.base import ModalitySpec
    from raypipe.fusion.registry import build_method

    out = {}
    for c in cands:
        m = build_method(c.method, [ModalitySpec(k, tuple(shapes[k])) for k in modalities], task, n_outputs,
                         TrainConfig.model_validate(c.train_cfg))
        out[c.label] = int(sum(p.numel() for p in m.parameters() if p.requires_grad))
    return out


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
    bag = refit_mode(cfg) == "bag"
    results, unfinished, errors = run_fits(jobs, data_ref, folds, task, sub.modalities, cfg.run.seed,
                                           patterns=False, return_predictions=True, deadline=deadline,
                                           progress_bars=console.bars_wanted(cfg), desc="auto", n_outputs=n_out,
                                           return_states=bag)
    seconds = time.perf_counter() - t0
    by_label: dict[str, dict[int, dict]] = {}
    fold_models: dict[str, dict[int, Any]] = {}  # bag: object refs of the fold models, fetched only if chosen
    for r in results:
        by_label.setdefault(r["method"], {})[r["fold"]] = r
        if "fold_model_ref" in r:
            fold_models.setdefault(r["method"], {})[r["fold"]] = r.pop("fold_model_ref")
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
    _write_replacing(os.path.join(out_dir, LEADERBOARD_FILE), lambda tmp: df.to_csv(tmp, index=False))
    rule = select_rule(cfg)
    complexity = None
    if rule == "simplest_1se":
        complexity = parameter_counts(complete, sub.modalities, sub.shapes, task, n_out)
    chosen = choose_model({l: per_fold[l] for l in labels + (["ensemble"] if "ensemble" in per_fold else [])},
                          higher, rule, complexity)
    if chosen == "ensemble" and len(weights) == 1:  # the ensemble is one model: that model
        chosen = next(iter(weights))
    summary = {"ok": True, "task": task, "metric": metric, "higher_is_better": higher, "folds": ac.folds,
               "rows": int(len(sub)), "candidates": [c.label for c in cands], "skipped": skipped, "best": best,
               "chosen": chosen, "select": rule, "ensemble_weights": weights, "cv_seconds": round(seconds, 1),
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
    summary["refit"] = refit_mode(cfg)
    summary["_candidates"] = {c.label: c for c in complete}
    if bag:  # only the chosen models' fold models are kept; the others' objects are freed with their refs
        keep = list(weights) if chosen == "ensemble" else [chosen]
        summary["_fold_models"] = {l: [fold_models[l][f] for f in range(ac.folds)] for l in keep}
    return summary


#: what is done with the chosen model (``train.auto.refit``): ``full`` = refitted on the full training split;
#: ``bag`` = no refit, the k CV fold models predict together (AutoGluon-style bagging). The modes and the
#: default (bag, and why) are :class:`raypipe.config.AutoConfig`'s, read from there so they live in one place.
REFIT_MODES = typing.get_args(AutoConfig.model_fields["refit"].annotation)
DEFAULT_REFIT = AutoConfig.model_fields["refit"].default


def refit_mode(cfg: Config) -> str:
    """``train.auto.refit`` (:data:`REFIT_MODES`; a config that lacks it: :data:`DEFAULT_REFIT`)."""
    mode = getattr(cfg.train.auto, "refit", None) or DEFAULT_REFIT
    if mode not in REFIT_MODES:
        raise ValueError(f"train.auto.refit {mode!r}: one of {', '.join(REFIT_MODES)}")
    return mode


def select_rule(cfg: Config) -> str:
    """``train.auto.select`` (:data:`SELECT_RULES`), else :data:`DEFAULT_SELECT`."""
    return getattr(cfg.train.auto, "select", None) or DEFAULT_SELECT


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
    fold_models = summary.pop("_fold_models", None)
    result = {k: summary[k] for k in ("ok", "task", "metric", "best", "chosen", "skipped", "cv_seconds",
                                      "leaderboard")}
    if summary["tune_trials"]:
        result["search_seconds"] = summary["search_seconds"]
    result["run_dir"] = os.path.abspath(run_dir)
    if refit:
        t0 = time.perf_counter()
        chosen = list(summary["ensemble_weights"]) if summary["chosen"] == "ensemble" else [summary["chosen"]]
        if summary["refit"] == "bag":  # no refit: the chosen candidates' CV fold models, saved as one model
            weights = summary["ensemble_weights"] if summary["chosen"] == "ensemble" else {summary["chosen"]: 1.0}
            final = _save_bag(cfg, table, task, run_dir, weights, cands, fold_models, summary["folds"],
                              summary["chosen"])
            del fold_models
        else:
            summary["refit_runner"] = runner = refit_runner([cands[label] for label in chosen])
            if summary["chosen"] == "ensemble":
                final = _refit_ensemble(cfg, table, task, run_dir, summary["ensemble_weights"], cands,
                                        runner=runner, cost=summary["fit_cpu_seconds"])
            else:
                final = _refit_single(cfg, table, task, run_dir, summary["chosen"], cands, runner=runner)
        summary["refit_seconds"] = round(time.perf_counter() - t0, 1)
        main = [k for k in final if k.startswith("test_")]
        result.update({k: final[k] for k in main})
        _annotate_metrics(run_dir, summary)
        result["refit_seconds"] = summary["refit_seconds"]
    _write_text(os.path.join(run_dir, SUMMARY_FILE), json.dumps(summary, indent=2, default=float))
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
    doc["auto"] = {k: summary[k] for k in ("metric", "best", "chosen", "select", "ensemble_weights", "skipped",
                                           "folds", "refit")}
    _write_text(path, json.dumps(doc, indent=2, default=float))


def refit_runner(members) -> str:
    """How the chosen candidates (:class:`Candidate`, a single one or an ensemble's members) are refitted,
    from their own train settings: ``"tasks"`` (1-CPU Ray tasks repeating the CV fits' own loop,
    :func:`raypipe.train.loop.fit`, constant learning rate; every member at once) when each trains on 1
    CPU worker, else ``"ray_train"`` (`raypipe train`'s TorchTrainer with its cosine learning-rate
    schedule, which DDP over ``num_workers`` workers or a GPU needs; members one after another). The two
    give different models from the same candidate."""
    needs = [(int(m.train_cfg.get("num_workers", 1)), bool(m.train_cfg.get("use_gpu", False))) for m in members]
    return "ray_train" if any(n > 1 or gpu for n, gpu in needs) else "tasks"


#: what a saved model leaves in its run directory (the CV's leaderboard.csv, folds.parquet, search.csv and
#: auto_summary.json aside): :func:`_clear_model_outputs` removes them before another model is saved there
MODEL_OUTPUTS = ("metrics.json", "model_meta.json", "model.pt", "predictions_test.parquet", "projection.parquet",
                 "history.json", "split.parquet", "config.yaml", "report.html", "members")


def _clear_model_outputs(run_dir: str) -> None:
    """Remove an earlier model's outputs (:data:`MODEL_OUTPUTS`) from ``run_dir`` before a new model is saved
    there, so that none the new model does not write (a refitted ensemble's ``members/``, ``history.json``,
    ``projection.parquet``) is left for `raypipe report` to show beside it. Each entry is first renamed into
    one hidden folder (``metrics.json`` and ``model_meta.json`` first: from then on the directory is no loadable
    run), which is then deleted: a crash part way leaves an incomplete run, never one model's files mixed
    with another's."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):  # what an earlier interrupted clear left
        if name.startswith(".stale-"):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    trash = os.path.join(run_dir, f".stale-{os.getpid()}")
    os.makedirs(trash, exist_ok=True)
    for name in MODEL_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.lexists(path):
            os.replace(path, os.path.join(trash, name))
    shutil.rmtree(trash)


def _write_replacing(path: str, write) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then renamed over it (atomic on one file system)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    _write_replacing(path, write)


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in label)


def _refit_fit(meta: dict, data, train_idx: np.ndarray, val_idx: np.ndarray, seed: int) -> dict:
    """One refit as a Ray task: the model of ``meta`` (built as `raypipe infer` rebuilds it) trained by
    :func:`raypipe.train.loop.fit` (the CV fits' loop: constant learning rate, no cosine schedule; for
    regression var_y from the train part's labels) on ``train_idx``, early-stopped on ``val_idx``,
    1 torch thread; returns the best epoch's state dict, the history, wall and CPU seconds."""
    import torch

    from raypipe.train import loop
    from raypipe.train.trainer import build_from_meta

    c0 = time.process_time()
    torch.set_num_threads(1)  # what the task was given; also what makes a refit repeatable (same machine, torch build)
    x, mask, y = data
    tc = meta["train_config"]
    torch.manual_seed(seed)
    method = build_from_meta(meta)
    part = lambda idx: ({m: x[m][idx] for m in meta["modalities"]}, mask[idx], y[idx])  # noqa: E731
    t0 = time.perf_counter()
    res = loop.fit(method, part(train_idx), part(val_idx), meta["task"], epochs=tc["epochs"],
                   batch_size=tc["batch_size"], lr=tc["lr"], weight_decay=tc["weight_decay"], p_drop=tc["p_drop"],
                   patience=tc["patience"], seed=seed, precision=tc.get("precision", "auto"))
    seconds = time.perf_counter() - t0
    history = [{("tla" if k == "train_tla" else k): v for k, v in h.items()} for h in res["history"]]
    best = history[res["best_epoch"] - 1] if res["best_epoch"] else history[-1]
    return {"state": {k: v.detach().clone() for k, v in method.state_dict().items()}, "history": history,
            "epoch": res["best_epoch"], "val": {k[4:]: v for k, v in best.items() if k.startswith("val_")},
            "seconds": seconds, "cpu_seconds": time.process_time() - c0}


def _refit_tasks(cfg: Config, table, task: str, dirs: dict[str, str], cands: dict,
                 cost: dict[str, float] | None = None) -> dict[str, dict]:
    """Refit each of ``dirs``' candidates (label -> run dir) on the training split as parallel 1-CPU Ray
    tasks (:func:`_refit_fit`, the CV fits' loop; the train part of the candidate's own split, early
    stopping on its val part) and write each run dir's model (``model.pt``, ``model_meta.json``: the
    format `raypipe infer` loads), ``history.json`` and ``split.parquet``. ``cost`` (e.g. the CV's CPU
    seconds per candidate): the costliest are submitted first, so the longest fit does not start last
    (the results do not depend on the order). If one fit fails, the others are cancelled before the error
    is raised. Returns per label the fit's seconds, CPU seconds and epochs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from raypipe.runtime import init_ray
    from raypipe.train.tables import infer_task
    from raypipe.train.trainer import META_FILE, MODEL_FILE, assign_splits, model_meta
    from raypipe.tune.folds import cancel_tasks

    init_ray(cfg)
    # each candidate's own split (its val_fraction); the test rows depend on ingest and the seed only
    splits = {label: assign_splits(table, _cfg_for(cfg, cands[label], d)) for label, d in dirs.items()}
    rows = splits[next(iter(dirs))] != "test"
    data_ref = ray.put(({m: v[rows] for m, v in table.x.items()}, table.mask[rows], table.y[rows]))
    _, n_outputs = infer_task(table.y, cfg.train.task)
    remote = ray.remote(num_cpus=1)(_refit_fit)
    metas, futures = {}, {}
    order = sorted(dirs, key=lambda l: -(cost or {}).get(l, 0.0))  # stable: candidate order among equals
    for label in order:  # all submitted at once: as many run together as the cluster has CPUs
        d = dirs[label]
        part = splits[label][rows]
        metas[label] = model_meta(_cfg_for(cfg, cands[label], d), table, task, n_outputs,
                                  fit_rows=splits[label] == "train")
        futures[label] = remote.remote(metas[label], data_ref, np.flatnonzero(part == "train"),
                                       np.flatnonzero(part == "val"), cfg.run.seed)
    done: dict[str, dict] = {}
    label_of = {ref: label for label, ref in futures.items()}
    pending = list(futures.values())
    try:
        while pending:  # in the order they finish, so a failure is seen while the others still run
            ready, pending = ray.wait(pending, num_returns=1)
            label = label_of[ready[0]]
            d = dirs[label]
            r = ray.get(ready[0])
            os.makedirs(d, exist_ok=True)
            _write_replacing(os.path.join(d, MODEL_FILE), lambda tmp: torch.save(r["state"], tmp))
            for name, doc in ((META_FILE, {**metas[label], "epoch": r["epoch"], "val": r["val"]}),
                              ("history.json", r["history"])):
                _write_text(os.path.join(d, name), json.dumps(doc, indent=2, default=float))
            split_table = pa.table({"sample_id": table.sample_id, "split": splits[label]})
            _write_replacing(os.path.join(d, "split.parquet"), lambda tmp: pq.write_table(split_table, tmp))
            done[label] = {"fit_seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"],
                           "epochs": len(r["history"])}
    except BaseException:  # one refit failed (or we were interrupted): the others are not left running
        cancel_tasks(pending)
        raise
    return {label: done[label] for label in dirs}


def _refit_single(cfg: Config, table, task: str, run_dir: str, label: str, cands: dict,
                  runner: str | None = None) -> dict:
    """Refit the chosen single candidate into ``run_dir`` (:func:`refit_runner`'s way), evaluate it on the test
    split; ``config.yaml`` holds the candidate's own settings (searched values included)."""
    runner = runner or refit_runner([cands[label]])
    own = _cfg_for(cfg, cands[label], run_dir)
    _clear_model_outputs(run_dir)
    if runner == "ray_train":
        from raypipe.train.trainer import run_train

        return run_train(own)
    from raypipe.train.trainer import load_trained

    fit = _refit_tasks(cfg, table, task, {label: run_dir}, cands)[label]
    method, _ = load_trained(run_dir)
    return _evaluate_and_write(own, table, task, run_dir, method, cands[label].method,
                               fit["fit_seconds"], {"refit": {label: fit}})


def _refit_ensemble(cfg: Config, table, task: str, run_dir: str, weights: dict[str, float], cands: dict,
                    runner: str | None = None, cost: dict[str, float] | None = None) -> dict:
    """Refit each member on the full training split into ``members/<name>`` (all at once as Ray tasks, or
    one after another through `raypipe train`'s path: :func:`refit_runner`), save them as one model, test it."""
    from raypipe.fusion.ensemble import EnsembleMethod, ensemble_meta, save_ensemble
    from raypipe.train.trainer import load_trained, run_train

    runner = runner or refit_runner([cands[label] for label in weights])
    _clear_model_outputs(run_dir)
    dirs = {label: os.path.join(run_dir, "members", _safe(label)) for label in weights}
    if runner == "tasks":
        fits = _refit_tasks(cfg, table, task, dirs, cands, cost)
        fit = max(f["fit_seconds"] for f in fits.values())  # they ran side by side
    else:
        fits, fit = {}, 0.0
        for label, d in dirs.items():
            res = run_train(_cfg_for(cfg, cands[label], d))
            fits[label] = {"fit_seconds": float(res.get("fit_seconds") or 0)}
            fit += fits[label]["fit_seconds"]
    members, metas, names = [], [], list(weights)
    for label in names:
        method, meta = load_trained(dirs[label])
        members.append(method)
        metas.append(meta)
    ws = [weights[n] for n in names]
    ens = EnsembleMethod(members, ws, names)
    save_ensemble(run_dir, ens, ensemble_meta(metas, ws, names))
    for f in ("split.parquet", "history.json"):
        if os.path.isfile(os.path.join(dirs[names[ens.top]], f)):
            _write_replacing(os.path.join(run_dir, f),
                             lambda tmp: shutil.copyfile(os.path.join(dirs[names[ens.top]], f), tmp))
    return _evaluate_and_write(cfg, table, task, run_dir, ens, "ensemble", fit,
                               {"members": {n: float(w) for n, w in zip(names, ens.weights.tolist())},
                                "refit": fits})


def _save_bag(cfg: Config, table, task: str, run_dir: str, weights: dict[str, float], cands: dict,
              fold_models: dict[str, list], n_folds: int, chosen: str) -> dict:
    """``train.auto.refit: bag``: no refit. Each chosen candidate's k CV fold models (each fitted on the other
    k-1 folds, fetched from their object refs) become members of one :class:`EnsembleMethod` with weight
    w_c / k each (w_c = the candidate's ensemble weight, 1 for a single candidate): its prediction is the
    weighted average of the candidates' bags, a bag being the plain mean of its fold models' probabilities
    (regression: values). Saved as one model (``model.pt`` + ``model_meta.json``, ``"refit": "bag"``) that
    `raypipe infer` and `raypipe report` load like any ensemble; per-modality reliability and imputation
    outputs are the top member's (the first fold model of the candidate with the largest weight). Then the
    test evaluation and outputs of the refit path (:func:`_evaluate_and_write`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from raypipe.fusion.ensemble import EnsembleMethod, ensemble_meta, save_ensemble
    from raypipe.train.tables import infer_task
    from raypipe.train.trainer import assign_splits, build_from_meta, model_meta

    t0 = time.perf_counter()
    _clear_model_outputs(run_dir)  # a bag writes no members/, history.json and maybe no projection.parquet
    _, n_outputs = infer_task(table.y, cfg.train.task)
    split = assign_splits(table, cfg)
    members, metas, names, ws = [], [], [], []
    for label, w in weights.items():
        refs = fold_models[label]
        if len(refs) != n_folds:
            raise RuntimeError(f"bag of {label}: {len(refs)} fold models for {n_folds} folds")
        meta = model_meta(_cfg_for(cfg, cands[label], run_dir), table, task, n_outputs, fit_rows=split != "test")
        for f, ref in enumerate(refs):
            got = ray.get(ref)
            member = build_from_meta(meta)
            member.load_state_dict(got["state"])
            member.eval()
            members.append(member)
            # var_y: the buffer the fold model trained with (its own fit rows' label variance; 1 unless regression)
            var_y = float(got["state"]["var_y"]) if "var_y" in got["state"] else meta["var_y"]
            metas.append({**meta, "var_y": var_y, "fold": f, "epoch": got["best_epoch"], "epochs": got["epochs"]})
            names.append(f"{label}/fold{f}")
            ws.append(float(w) / n_folds)
    ens = EnsembleMethod(members, ws, names)
    meta = ensemble_meta(metas, ws, names)
    meta.update(refit="bag", bag={label: n_folds for label in weights})
    save_ensemble(run_dir, ens, meta)
    split_table = pa.table({"sample_id": table.sample_id, "split": np.where(split == "test", "test", "train")})
    _write_replacing(os.path.join(run_dir, "split.parquet"), lambda tmp: pq.write_table(split_table, tmp))
    assemble = time.perf_counter() - t0
    own = cfg if chosen == "ensemble" else _cfg_for(cfg, cands[chosen], run_dir)
    name = "ensemble" if chosen == "ensemble" else cands[chosen].method
    return _evaluate_and_write(own, table, task, run_dir, ens, name,
                               0.0, {"refit": "bag", "members": {l: float(w) for l, w in weights.items()},
                                     "bag": {"folds": n_folds, "fold_models": len(members),
                                             "assemble_seconds": round(assemble, 2)}})


def _predict_members(members: list, weights: list[float], task: str, x: dict, passes: list[dict],
                     top: int | None) -> list[dict]:
    """Ray task of :func:`_ensemble_predictions`: for each evaluation pass, sum_i w_i p_i over ``members`` (in
    float64, members with weight 0 skipped, as :class:`~raypipe.fusion.ensemble.EnsembleMethod` does) and, from
    member ``top`` (if in this group), its per-modality outputs. 1 torch thread: what the task was given."""
    import torch

    from raypipe.train import loop
    from raypipe.train.evaluate import predict_inputs

    torch.set_num_threads(1)
    out = [{"probabilities": None, "pass": p["id"]} for p in passes]
    for i, (member, w) in enumerate(zip(members, weights)):
        if w <= 0:
            continue
        for o, got in zip(out, predict_inputs(loop.make_predict_fn(member, task), x, passes)):
            p = got["probabilities"].astype(np.float64) * w
            o["probabilities"] = p if o["probabilities"] is None else o["probabilities"] + p
            if i == top:
                o.update({k: v for k, v in got.items() if k not in ("probabilities", "pass")})
    return out


def _ensemble_predictions(model, task: str, x: dict, passes: list[dict]) -> list[dict] | None:
    """An ensemble's test-evaluation predictions (:func:`raypipe.train.evaluate.evaluation_inputs`), its members
    split round-robin over as many 1-CPU Ray tasks as the cluster has CPUs (at most one per member): the same
    values as ``EnsembleMethod.predict_with_trace`` (probabilities: the weighted sum in float64, then float32;
    only the summation order differs), where the driver would predict every member one after another with
    torch's default threads (a bag has k x members; on the 2-core VM two torch threads beside other work ran a
    pass 2.4x slower than one). None without Ray or for a single member."""
    import ray

    from raypipe.fusion.ensemble import EnsembleMethod
    from raypipe.tune.folds import cancel_tasks

    if not isinstance(model, EnsembleMethod) or len(model.members) < 2 or not ray.is_initialized():
        return None
    weights = model.weights.tolist()
    n_tasks = max(1, min(len(model.members), int(ray.cluster_resources().get("CPU", 1))))
    groups = [list(range(g, len(model.members), n_tasks)) for g in range(n_tasks)]
    remote = ray.remote(num_cpus=1)(_predict_members)
    x_ref, passes_ref = ray.put(x), ray.put(passes)
    refs = [remote.remote([model.members[i] for i in idx], [weights[i] for i in idx], task, x_ref, passes_ref,
                          idx.index(model.top) if model.top in idx else None) for idx in groups]
    try:
        parts = ray.get(refs)
    except BaseException:
        cancel_tasks(refs)
        raise
    out = []
    for j in range(len(passes)):
        total, traces = None, {}
        for idx, part in zip(groups, parts):
            p = part[j]["probabilities"]
            if p is not None:
                total = p if total is None else total + p
            if model.top in idx:
                traces = {k: v for k, v in part[j].items() if k not in ("probabilities", "pass")}
        out.append({**traces, "probabilities": total.astype(np.float32), "pass": parts[0][j]["pass"]})
    return out


def _evaluate_and_write(cfg: Config, table, task: str, run_dir: str, model, method_name: str, fit_seconds: float,
                        extra: dict) -> dict:
    """What `raypipe train` writes after its fit: test metrics (``metrics.json``), ``predictions_test.parquet``,
    the imputation ``projection.parquet`` (an ensemble's: its top member's) and ``config.yaml``."""
    from raypipe.config import dump_config
    from raypipe.train import loop
    from raypipe.train.evaluate import evaluate_test, evaluation_inputs
    from raypipe.train.metrics import main_metric_name
    from raypipe.train.trainer import _write_test_predictions, assign_splits, imputation_projection

    split = assign_splits(table, cfg)
    test = table.take(split == "test")
    groups = {k: v for k, v in test.groups.items() if k in cfg.ingest.group_columns}
    # an ensemble's (a bag's) members predict in parallel Ray tasks; else the driver predicts
    predictions = _ensemble_predictions(model, task, test.x, evaluation_inputs(test.mask, table.modalities,
                                                                               cfg.run.seed))
    test_metrics, natural = evaluate_test(loop.make_predict_fn(model, task), test.x, test.mask, test.y, task,
                                          table.modalities, groups, seed=cfg.run.seed,
                                          gap_threshold=cfg.report.subgroup_gap_threshold, predictions=predictions)
    main = main_metric_name(task)
    doc = {"method": method_name, "task": task, "modalities": table.modalities, "main_metric": main,
           "n": {s: int((split == s).sum()) for s in ("train", "val", "test")}, "fit_seconds": fit_seconds,
           **extra, "test": test_metrics}
    _write_text(os.path.join(run_dir, "metrics.json"), json.dumps(doc, indent=2, default=float))
    _write_replacing(os.path.join(run_dir, "predictions_test.parquet"),
                     lambda tmp: _write_test_predictions(tmp, test, natural))
    proj = imputation_projection(getattr(model, "top_member", model), test)
    if proj is not None:
        _write_replacing(os.path.join(run_dir, "projection.parquet"), lambda tmp: proj.to_parquet(tmp, index=False))
    _write_text(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
    return {"ok": True, f"test_{main}": test_metrics["natural"].get(main), "fit_seconds": round(fit_seconds, 1)}


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
            f"folds, ddof=1; paired t-test against the best); chosen (rule "
            f"{html.escape(str(summary.get('select', 'best')))}, docs/tune.md) and "
            + ("bagged (its cross-validation fold models predict together, no refit)"
               if summary.get("refit") == "bag" else "refitted")
            + f": <b>{html.escape(str(summary.get('chosen', '?')))}</b>.</p>{note}"
            f"<table><tr>{head}</tr>{''.join(body)}</table>")
