"""The k-fold machinery that `raypipe compare`, `raypipe tune` and ``train.method=auto`` share.

- which rows are cross-validated (``tune.holdout``: the training portion, or every row);
- the selection metric (``--metric``: any metric the task reports) and its direction;
- one (method, fold) fit as a Ray task: train on the other folds (minus a validation part
  for early stopping), predict the held-out fold (its out-of-fold predictions), score it;
- running many such fits as 1-CPU Ray tasks (the data put in the object store once) with one
  progress bar (``ray.progress_bars``), an optional deadline (fits still running then are
  cancelled) and Ctrl+C cancelling everything.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: metrics each task reports (raypipe.train.metrics) that can rank methods; True = higher is better
TASK_METRICS: dict[str, dict[str, bool]] = {
    "binary": {"auroc": True, "auprc": True, "f1": True, "f1_youden": True, "brier": False},
    "multiclass": {"auroc": True, "accuracy": True, "macro_f1": True},
    "multilabel": {"auroc": True},
    "regression": {"r2": True, "mae": False, "smape": False},
}


def resolve_metric(name: str | None, task: str) -> tuple[str, bool]:
    """(metric, higher_is_better) for ``name`` ("auto"/None = the task's main metric); a clear error otherwise."""
    from raypipe.train.metrics import main_metric_name

    if not name or name == "auto":
        return main_metric_name(task), True
    known = TASK_METRICS[task]
    if name in known:
        return name, known[name]
    if task == "multilabel" and name.startswith("auroc_label") and name[len("auroc_label"):].isdigit():
        return name, True
    raise ValueError(f"metric {name!r} is not reported for a {task} task; one of {', '.join(known)}"
                     + (" or auroc_label<j>" if task == "multilabel" else ""))


def cv_rows(table, cfg) -> np.ndarray:
    """Boolean mask of the rows that are cross-validated (``tune.holdout``)."""
    if cfg.tune.holdout == "none":
        return np.ones(len(table), dtype=bool)
    from raypipe.train.trainer import assign_splits

    return assign_splits(table, cfg) != "test"


def write_folds(path: str, sample_ids: np.ndarray, folds: np.ndarray) -> None:
    """``folds.parquet``: sample_id -> fold, so an outside reference can use the same folds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sample_id": np.asarray(sample_ids).astype(str), "fold": np.asarray(folds, np.int64)}),
                   path + ".tmp")
    os.replace(path + ".tmp", path)


def n_outputs_for(task: str, y: np.ndarray) -> int:
    return 2 if task == "binary" else int(np.nanmax(y)) + 1 if task == "multiclass" else (
        y.shape[1] if task == "multilabel" else 1)


def fold_task(method: str, omni: dict, train_cfg: dict, data_ref, fold: int, folds: np.ndarray, task: str,
              modalities: list[str], seed: int, patterns: bool = True, return_predictions: bool = False,
              n_outputs: int | None = None, return_state: bool = False) -> dict[str, Any]:
    """Train ``method`` on folds != fold (minus a 20 % validation part for early stopping), test on fold.

    Returns the fold's metrics (natural missingness; with ``patterns`` also the main metric per
    modality pattern), ``seconds`` of fitting and, with ``return_predictions``, the held-out
    rows' probabilities (``oof``: out-of-fold predictions for ensemble selection).
    ``train_cfg`` is a TrainConfig dict (its ``p_drop`` simulates missing modalities in training).
    With ``return_state`` (``train.auto.refit: bag``; off for compare and tune) also ``fold_model``:
    the trained model's state dict (CPU tensors, the best epoch's weights as ``loop.fit`` leaves them),
    ``best_epoch`` and ``epochs`` run, so the fold model can predict later without a refit.
    """
    import torch

    from raypipe.config import TrainConfig
    from raypipe.fusion.base import ModalitySpec
    from raypipe.fusion.registry import build_method
    from raypipe.train import loop
    from raypipe.train.evaluate import all_patterns, pattern_name
    from raypipe.train.metrics import compute_metrics, main_metric_name
    from raypipe.train.splits import holdout_mask

    torch.set_num_threads(1)
    x, mask, y, ids, shapes = data_ref
    tc = TrainConfig.model_validate(train_cfg)
    tc = tc.model_copy(update={"omnifuse": tc.omnifuse.model_copy(update=omni)})
    torch.manual_seed(seed + fold)
    model = build_method(method, [ModalitySpec(m, tuple(shapes[m])) for m in modalities], task,
                         n_outputs or n_outputs_for(task, y), tc)
    tr_all, te = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
    val = holdout_mask(ids[tr_all], y[tr_all], fraction=0.2, seed=seed + fold)
    part = lambda idx: ({m: x[m][idx] for m in modalities}, mask[idx], y[idx])  # noqa: E731
    t0 = time.perf_counter()
    fitted = loop.fit(model, part(tr_all[~val]), part(tr_all[val]), task, epochs=tc.epochs,
                      batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay, p_drop=tc.p_drop,
                      patience=tc.patience, seed=seed + fold)
    seconds = time.perf_counter() - t0
    predict = loop.make_predict_fn(model, task)
    xt, mt, yt = part(te)
    probs = predict(xt, mt)["probabilities"]
    row = {"method": method, "fold": fold, "seconds": seconds, **compute_metrics(task, yt, probs)}
    if patterns:
        main = main_metric_name(task)
        for pat in all_patterns(len(modalities)):
            want = np.array(pat)
            rows = np.all(mt[:, want], axis=1)
            if rows.sum() >= 4:
                pm = np.broadcast_to(want, (int(rows.sum()), len(modalities))).copy()
                out = predict({m: v[rows] for m, v in xt.items()}, pm)
                row[f"{main}[{pattern_name(modalities, pat)}]"] = compute_metrics(
                    task, yt[rows], out["probabilities"]).get(main)
    if return_predictions:
        row["oof"] = np.asarray(probs, np.float32)
    if return_state:
        row["fold_model"] = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                             "best_epoch": fitted.get("best_epoch"), "epochs": len(fitted.get("history", []))}
    return row


@dataclass
class FitJob:
    """One (label, fold) fit: ``label`` names the row (a method, an ablation, a candidate)."""

    label: str
    method: str
    fold: int
    train_cfg: dict
    omni: dict = field(default_factory=dict)


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar of fits when ``enabled`` (:func:`raypipe.console.bars_wanted`), else a silent stand-in."""
    from raypipe import console

    return console.progress(total, desc, enabled, unit="fit")


def _fit_job(*args) -> dict[str, Any]:
    """:func:`fold_task` as a Ray task: its row plus ``cpu_seconds``, this process's CPU time for the whole
    job (fit, prediction, scoring), which other load on the machine does not inflate as it does wall time."""
    c0 = time.process_time()
    row = fold_task(*args)
    row["cpu_seconds"] = time.process_time() - c0
    return row


def _fit_job_with_state(*args) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`_fit_job` with ``return_state``, as a task of two returns: (the row, the fold model): the
    driver gets the row and only an object reference to the fold model, which stays in the object store."""
    row = _fit_job(*args)
    return row, row.pop("fold_model")


def cancel_tasks(refs, timeout_s: float = 30.0) -> None:
    """Force-cancel Ray tasks (their workers are killed) and wait until each has ended, cancelling again
    the ones still not done: a cancel that meets a task while it is being scheduled can be lost, and a
    task left running holds its CPU for good (an endless fit did, in CI). Gives up after ``timeout_s``."""
    import ray

    left, deadline = list(refs), time.monotonic() + timeout_s
    while left and time.monotonic() < deadline:
        for r in left:
            ray.cancel(r, force=True)
        _, left = ray.wait(left, num_returns=len(left), timeout=1.0)
    if left:
        log.warning("%d cancelled task(s) still running after %.0f s", len(left), timeout_s)


def run_fits(jobs: Sequence[FitJob], data_ref, folds: np.ndarray, task: str, modalities: list[str], seed: int,
             *, patterns: bool = True, return_predictions: bool = False, deadline: float | None = None,
             progress_bars: bool = True, desc: str = "folds", n_outputs: int | None = None,
             return_states: bool = False) -> tuple[list[dict], list[FitJob], dict[str, str]]:
    """Run every job as a 1-CPU Ray task; returns (finished rows, unfinished jobs, errors per label).

    Jobs are submitted in the given order (Ray starts them in that order as CPUs free up).
    ``deadline`` (a ``time.monotonic()`` value): jobs not finished by then are cancelled and
    returned as unfinished. A job that raises is recorded in ``errors`` (its label's message).
    ``return_states`` (``train.auto.refit: bag``; default off, so compare and tune are unchanged): each
    row also has ``fold_model_ref``, an object reference to the fold model (:func:`fold_task`'s
    ``fold_model``: state dict, best epoch), which stays in the object store until it is fetched or dropped.

    Why tasks and not a pool of long-lived actors (tried and measured, benchmarks/RESULTS.md): Ray
    keeps a task's worker process for the next task, so torch and raypipe are imported once per
    process for the whole Ray session (the next compare or auto in the same session starts warm),
    while actors are new processes each call; the data argument (``data_ref``, put once) reaches a
    task without a copy, and per-task overhead was ~0.25 s of argument handling at load 25 against
    fits of seconds to minutes.
    """
    import ray

    remote = (ray.remote(num_cpus=1, num_returns=2)(_fit_job_with_state) if return_states
              else ray.remote(num_cpus=1)(_fit_job))
    futures, states = {}, {}
    for j in jobs:
        args = (j.method, j.omni, j.train_cfg, data_ref, j.fold, folds, task, modalities, seed, patterns,
                return_predictions, n_outputs, *((True,) if return_states else ()))
        ref = remote.remote(*args)
        if return_states:  # (row, fold model): the row is fetched, the fold model stays a reference
            ref, state = ref
            states[ref] = state
        futures[ref] = j
    rows: list[dict] = []
    errors: dict[str, str] = {}
    pending = list(futures)
    try:
        with progress(len(pending), desc, progress_bars) as bar:
            while pending:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
                if not done:  # the deadline passed
                    break
                job = futures[done[0]]
                try:
                    r = ray.get(done[0])
                except Exception as err:  # noqa: BLE001 - one method failing must not stop the others
                    cause = getattr(err, "cause", None) or err
                    errors.setdefault(job.label, f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}")
                    log.warning("%s fold %d failed: %s", job.label, job.fold, errors[job.label])
                else:
                    r["method"] = job.label
                    if return_states:
                        r["fold_model_ref"] = states[done[0]]
                    rows.append(r)
                bar.update(1)
    except KeyboardInterrupt:
        cancel_tasks(pending)
        raise
    cancel_tasks(pending)
    return rows, [futures[f] for f in pending], errors


def summarise(values: np.ndarray) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1) over folds, ignoring NaN."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
