"""Cross-validated hyper-parameter search with Ray Tune: `raypipe tune`.

Each trial scores one configuration by k-fold cross-validation (grouped by
patient, stratified) on the *training portion* only; the test split is never
seen. The Tune function trainable fits each fold either with the
framework-free loop in its own process (``tune.fold_runner`` "trial", the
default for 1-worker training) or by building and fitting a V2
``TorchTrainer`` itself ("ray_train"; a ``TorchTrainer`` cannot be handed to
a ``Tuner`` in Ray 2.60), and reports after every fold, so ASHA can stop a
hopeless trial after its first folds. Outputs under ``<out_dir>/tune``:
``results.csv`` (one row per trial), ``best_config.yaml`` (accepted unchanged
by `raypipe train --config`) and the final model trained with it on the whole
training portion.

``train.method=auto`` searches its candidates' hyper-parameters with the same machinery
(:func:`search_candidates`: one ``Tuner``, the candidate a grid dimension, auto's folds and
fold function).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from raypipe import console
from raypipe.config import Config, config_from_dict, dump_config, fingerprint
from raypipe.tune.folds import summarise

log = logging.getLogger(__name__)

#: default search space: name -> (kind, low, high) or ("choice", [values]); keys are TrainConfig paths
DEFAULT_SPACE: dict[str, tuple] = {
    "omnifuse.beta": ("loguniform", 0.1, 2.0),
    "omnifuse.alpha": ("loguniform", 0.01, 1.0),
    "omnifuse.lambda1": ("loguniform", 0.1, 10.0),
    "omnifuse.lambda2": ("loguniform", 1.0, 100.0),
    "omnifuse.lambda3": ("loguniform", 0.05, 5.0),
    "omnifuse.depth": ("randint", 1, 9),  # R in 1..8
    "lr": ("loguniform", 1e-4, 3e-3),
    "hidden_dim": ("choice", [32, 64, 128]),
}


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune search-space objects from the defaults updated by ``tune.space`` in the config.

    ``tune.space`` entries look like ``{"lr": ["loguniform", 1e-4, 1e-2], "hidden_dim": ["choice", [64, 128]]}``;
    a plain value fixes the key.
    """
    from ray import tune

    spec: dict[str, Any] = dict(DEFAULT_SPACE)
    for k, v in cfg.tune.space.items():
        spec[k] = tuple(v) if isinstance(v, (list, tuple)) and v and isinstance(v[0], str) else v
    grid = cfg.tune.search == "grid"
    out: dict[str, Any] = {}
    for key, v in spec.items():
        if not isinstance(v, tuple):
            out[key] = v
            continue
        kind = v[0]
        if grid:  # grid search over a few points of each range
            if kind == "choice":
                out[key] = tune.grid_search(list(v[1]))
            elif kind == "randint":
                out[key] = tune.grid_search(sorted({int(v[1]), int((v[1] + v[2]) // 2), int(v[2] - 1)}))
            else:
                out[key] = tune.grid_search([float(np.sqrt(v[1] * v[2]))])
        elif kind == "loguniform":
            out[key] = tune.loguniform(v[1], v[2])
        elif kind == "uniform":
            out[key] = tune.uniform(v[1], v[2])
        elif kind == "randint":
            out[key] = tune.randint(v[1], v[2])
        elif kind == "choice":
            out[key] = tune.choice(list(v[1]))
        else:
            raise ValueError(f"tune.space.{key}: unknown kind {kind!r} (loguniform, uniform, randint, choice)")
    return out


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """``cfg`` with ``train.<key>`` set from a trial's params (dotted keys under train)."""
    data = cfg.model_dump(mode="json")
    for key, value in params.items():
        node = data["train"]
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value.item() if hasattr(value, "item") else value
    return config_from_dict(data, "<tune trial>")


CV_STATE_FILE = "cv_state.json"


def fold_runner(cfg: Config) -> str:
    """``tune.fold_runner`` resolved: "trial" (framework-free loop in the trial) or "ray_train"."""
    runner = cfg.tune.fold_runner
    if runner == "auto":
        return "trial" if cfg.train.num_workers == 1 else "ray_train"
    return runner


def _fit_fold_in_trial(cfg: Config, meta: dict, data: tuple, fold: int) -> float:
    """One fold with the framework-free loop in the trial's own process: best validation score.

    The same fold as the TorchTrainer path computes (train on the other folds, early-stop and
    score on this one, same epochs, batch size and seed; only that path's feed shuffles its own
    way); no worker group, process group, dataset feed or per-epoch checkpoint to pay for.
    """
    import torch

    from raypipe.train import loop
    from raypipe.train.trainer import build_from_meta

    x, mask, y, fold_of = data
    tc = cfg.train
    device = "cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(meta["seed"])
    method = build_from_meta(meta).to(device)
    part = lambda rows: ({m: v[rows] for m, v in x.items()}, mask[rows], y[rows])  # noqa: E731
    out = loop.fit(method, part(fold_of != fold), part(fold_of == fold), meta["task"], epochs=tc.epochs,
                   batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay, p_drop=tc.p_drop,
                   patience=tc.patience, seed=meta["seed"], device=device, precision=tc.precision)
    return _selected_score(out["history"], out["best_epoch"], meta, float(out["best_val"]))


def _selected_score(history: list[dict], best_epoch: int, meta: dict, best_val: float) -> float:
    """The fold's score on ``tune.metric`` at the best (early-stopping) epoch; the main metric's is best_val."""
    metric = meta.get("select_metric") or meta.get("main_metric")
    if metric is None or metric == meta.get("main_metric") or not best_epoch:
        return best_val
    return float(history[best_epoch - 1].get(f"val_{metric}", np.nan))


def _report_fold(f: int, scores: list[float], t0: float) -> None:
    """Report fold ``f``'s score and the running CV mean/std to Tune, with the fold scores so far as
    the trial's checkpoint (a restored trial resumes at the next fold)."""
    import ray.tune

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, CV_STATE_FILE), "w") as fh:
            json.dump({"fold_scores": scores}, fh)
        ray.tune.report({"fold": f + 1, "fold_score": scores[-1], "cv_mean": float(np.nanmean(scores)),
                         "cv_std": summarise(np.asarray(scores))[1], "fold_seconds": time.perf_counter() - t0,
                         "fold_scores": json.dumps(scores)},
                        checkpoint=ray.tune.Checkpoint.from_directory(tmp))


def _cv_trainable(config: dict, base_config: dict, folds: dict, meta: dict, data: tuple | None = None) -> None:
    """One Tune trial: k folds, a report after every fold.

    Each fold is fitted by the framework-free loop in this process when ``data`` (the training
    portion's arrays and fold of each row) is given (``tune.fold_runner`` "trial"), else by one
    Ray Train V2 ``TorchTrainer`` (``fit_torch_trainer``) built and fitted here.
    Every report carries a small Tune checkpoint (the fold scores so far): a trial restarted by
    ``Tuner.restore`` continues at its first unfinished fold instead of refitting the done ones.
    ``base_config``, ``folds`` (sample_id -> fold), ``meta`` and ``data`` come through
    ``tune.with_parameters`` (the object store), so ``config`` holds only the searched parameters.
    """
    import ray.data
    import ray.tune

    from raypipe.runtime import configure_data_context
    from raypipe.train.trainer import fit_torch_trainer

    cfg = apply_params(config_from_dict(base_config, "<tune base>"), config)
    meta = dict(meta)
    meta["train_config"] = cfg.train.model_dump(mode="json")
    if data is not None:
        import torch

        # the trial holds whole CPUs (tune.with_resources): one torch thread per CPU it holds
        torch.set_num_threads(max(1, int(ray.tune.get_context().get_trial_resources().required_resources
                                         .get("CPU", 1))))
    else:
        # A trial runs in its own process, whose Ray Data context is the library default: give it
        # raypipe's (ordered, no dropped blocks) and, as `raypipe train` does, no progress bars for
        # the instant per-epoch feeds (they used to print inside every trial).
        configure_data_context(cfg)
        ray.data.DataContext.get_current().enable_progress_bars = False
    k = max(folds.values()) + 1
    trial = ray.tune.get_context().get_trial_id()
    scores: list[float] = []
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d, open(os.path.join(d, CV_STATE_FILE)) as fh:
            scores = [float(v) for v in json.load(fh)["fold_scores"]]
        log.info("trial %s resumes at fold %d of %d", trial, len(scores) + 1, k)
    for f in range(len(scores), k):
        t0 = time.perf_counter()
        if data is not None:
            scores.append(_fit_fold_in_trial(cfg, meta, data, f))
        else:
            train_ids = {s for s, v in folds.items() if v != f}
            val_ids = {s for s, v in folds.items() if v == f}
            result = fit_torch_trainer(cfg, meta, train_ids, val_ids, f"{cfg.run.name}-tune-{trial}-fold{f}",
                                       meta["storage_path"], log_epochs=False)
            scores.append(_trainer_fold_score(result, meta))
        _report_fold(f, scores, t0)


def _trainer_fold_score(result, meta: dict) -> float:
    """A TorchTrainer fold's score: ``tune.metric`` at the epoch that was best on the main metric."""
    main = meta.get("main_metric")
    metric = meta.get("select_metric") or main
    best = (result.metrics or {}).get("best_val", np.nan)
    if metric == main:
        return float(best)  # best validation score
    reports = [m for _, m in (getattr(result, "best_checkpoints", None) or []) if f"val_{main}" in m]
    if not reports:
        return float("nan")
    return float(max(reports, key=lambda m: m[f"val_{main}"]).get(f"val_{metric}", np.nan))


def search_fingerprint(cfg: Config) -> str:
    """8 hex digits identifying what a search computes (everything but the ``ray`` section).

    The experiment and the final run are named with it: running the same search again resumes
    it, a changed config or space starts a new one instead of silently restoring the old.
    """
    data = cfg.model_dump(mode="json")
    data.pop("ray", None)
    data["run"].pop("out_dir", None)  # the same search under a moved directory is the same search
    return fingerprint(data)


def _expected_trials(cfg: Config) -> int:
    """How many trials a complete search has: num_samples, times the grid size for grid search."""
    n = cfg.tune.num_samples
    for v in search_space(cfg).values():
        if isinstance(v, dict) and "grid_search" in v:
            n *= len(v["grid_search"])
    return n


def run_tune(cfg: Config, train_final: bool = True) -> dict:
    """Run the k-fold search, write the results table and best config, train the final model.

    ``train_final=False`` stops after the search (the benchmark times the search alone).
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raypipe.runtime import cluster_resources, init_ray
    from raypipe.train import metrics as M
    from raypipe.train.splits import kfold_assignments
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import model_meta, run_train
    from raypipe.tune.folds import cv_rows, resolve_metric, write_folds

    # everything that can be wrong with the input fails here, before Ray starts
    table = read_embeddings(cfg.train_input, cfg.ingest.label_columns)
    task, n_outputs = infer_task(table.y, cfg.train.task)
    metric, higher = resolve_metric(cfg.tune.metric, task)
    portion = cv_rows(table, cfg)  # tune.holdout test_split: the search never sees the test split
    ids, y = table.sample_id[portion], table.y[portion]
    folds = kfold_assignments(ids, y, k=cfg.tune.folds, seed=cfg.run.seed)
    rctx = init_ray(cfg)
    out_dir = cfg.tune.out or cfg.path("tune")
    os.makedirs(out_dir, exist_ok=True)
    write_folds(os.path.join(out_dir, "folds.parquet"), ids, folds)
    meta = model_meta(cfg, table, task, n_outputs, fit_rows=portion)  # var_y never from the test split
    main = M.main_metric_name(task)
    meta["main_metric"] = main
    meta["select_metric"] = metric
    meta["storage_path"] = rctx.results_dir

    res = cluster_resources()
    runner = fold_runner(cfg)
    if runner == "trial":
        # the trial computes: one CPU (and one GPU with train.use_gpu) each; the folds' arrays go
        # to the object store once and every trial reads them from there
        trial_resources = {"CPU": 1.0, **({"GPU": 1.0} if cfg.train.use_gpu else {})}
        slots = int(res["CPU"]) if not cfg.train.use_gpu else int(min(res["CPU"], res.get("GPU", 0)))
        rows = np.flatnonzero(portion)
        data = ({m: v[rows] for m, v in table.x.items()}, table.mask[rows], table.y[rows], np.asarray(folds))
    else:
        # the trial only drives its TorchTrainers; their workers leave a CPU for Ray Data's reads
        trial_resources, data = {"CPU": 0.01}, None
        slots = int(res["CPU"] // (cfg.train.num_workers + 1))
    max_conc = cfg.tune.max_concurrent_trials or max(1, slots)
    scheduler = (ASHAScheduler(time_attr="fold", max_t=cfg.tune.folds, grace_period=1, reduction_factor=2)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    search_alg = None
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.run.seed)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_cv_trainable, base_config=cfg.model_dump(mode="json"),
                                 folds={s: int(f) for s, f in zip(ids, folds)}, meta=meta, data=data),
        trial_resources)
    search_fp = search_fingerprint(cfg)
    name = f"{cfg.run.name}-tune-{search_fp}"
    path = os.path.join(rctx.results_dir, name)
    resumed = bool(ray.tune.Tuner.can_restore(path))
    if resumed:
        log.info("resuming the interrupted search at %s", path)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=ray.tune.TuneConfig(metric="cv_mean", mode="max" if higher else "min",
                                            num_samples=cfg.tune.num_samples,
                                            scheduler=scheduler, search_alg=search_alg,
                                            max_concurrent_trials=max_conc,
                                            # a trial's process (torch and raypipe imported) runs the next trial
                                            reuse_actors=runner == "trial"),
            # no Tune status tables where there are no bars (ray.progress_bars false, or no terminal)
            run_config=ray.tune.RunConfig(name=name, storage_path=rctx.results_dir,
                                          verbose=None if console.bars_wanted(cfg) else 0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    finished = grid.num_terminated + grid.num_errors
    expected = _expected_trials(cfg)
    rows = []
    space_keys = list(search_space(cfg))
    for r in grid:
        if not r.metrics or "fold_scores" not in r.metrics:  # not started, or no fold finished
            continue
        scores = json.loads(r.metrics.get("fold_scores", "[]"))
        row = {"trial_id": r.metrics.get("trial_id"), **{k: r.config.get(k) for k in space_keys},
               "cv_mean": r.metrics.get("cv_mean"), "cv_std": r.metrics.get("cv_std"),
               "folds_done": len(scores), "fold_scores": scores, "seconds": r.metrics.get("time_total_s")}
        rows.append(row)
    import pandas as pd

    results_csv = os.path.join(out_dir, "results.csv")
    df = pd.DataFrame(rows, columns=["trial_id", *space_keys, "cv_mean", "cv_std", "folds_done", "fold_scores",
                                     "seconds"]).sort_values("cv_mean", ascending=not higher)
    df.to_csv(results_csv, index=False)
    best_path = os.path.join(out_dir, "best_config.yaml")
    if os.path.exists(best_path):  # a best config always belongs to the search just finished
        os.remove(best_path)
    if finished < expected:
        # Tune returns normally after a SIGINT (it saved its state): no best config from half a search.
        log.warning("the search stopped after %d of %d trials; run the same command again to resume it",
                    finished, expected)
        return {"ok": False, "interrupted": True, "trials_finished": finished, "trials_expected": expected,
                "search_seconds": round(seconds, 1), "experiment": path,
                "message": "search interrupted; run the same command again to resume it",
                "results": os.path.abspath(results_csv)}
    if not len(df):
        raise RuntimeError(f"no trial of the search finished a fold (see {path})")
    complete = df[df["folds_done"] == cfg.tune.folds]
    best_row = (complete if len(complete) else df).iloc[0]
    best_cfg = apply_params(cfg, {k: best_row[k] for k in space_keys})
    final_dir = os.path.join(out_dir, "final")
    # The final run gets its own name: Ray Train V2 resumes a run whose name and storage path it
    # finds again, so reusing `run.name` would pick up an earlier `raypipe train` of this out_dir
    # (another config: a shape mismatch or no training at all). Named by the tuned train config,
    # the same best config finds its own finished run again and a different one starts afresh.
    tuned = fingerprint(best_cfg.train.model_dump(mode="json"))
    best_cfg = best_cfg.model_copy(update={
        "run": best_cfg.run.model_copy(update={"name": f"{cfg.run.name}-tuned-{tuned}"}),
        "train": best_cfg.train.model_copy(update={"out": final_dir})})
    with open(best_path, "w") as fh:
        fh.write(dump_config(best_cfg))
    summary = {"ok": True, "metric": metric, "higher_is_better": higher, "holdout": cfg.tune.holdout,
               "trials": len(df), "trials_complete": len(complete), "resumed": resumed,
               "fold_runner": runner, "max_concurrent_trials": max_conc, "search_seconds": round(seconds, 1),
               "best_cv_mean": best_row["cv_mean"], "best_cv_std": best_row["cv_std"],
               "results": os.path.abspath(results_csv),
               "best_config": os.path.abspath(best_path), "experiment": path}
    if train_final:
        final = run_train(best_cfg)
        summary.update({f"final_test_{main}": final.get(f"test_{main}"), "final_run_dir": final.get("run_dir")})
    return summary


# ----------------------------------------------------------------- train.method=auto: search per candidate
AUTO_SEARCH_FILE = "search.csv"


def candidate_space_keys(cfg: Config, method: str) -> list[str]:
    """The search-space keys (``DEFAULT_SPACE`` updated by ``tune.space``) that act on ``method``.

    ``omnifuse.*`` keys configure OmniFuse only; every other key (``lr``, ``hidden_dim``, any
    other ``train.*`` key given in ``tune.space``) is searched for every candidate.
    """
    return [k for k in search_space(cfg) if method == "omnifuse" or not k.startswith("omnifuse.")]


def apply_train_params(train_cfg: dict, params: dict[str, Any]) -> dict:
    """A TrainConfig dict with dotted ``params`` (``lr``, ``omnifuse.depth``, ...) set, validated."""
    from raypipe.config import TrainConfig

    train = json.loads(json.dumps(train_cfg))
    for key, value in params.items():
        node, parts = train, key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = _plain(value)
    return TrainConfig.model_validate(train).model_dump(mode="json")


def _auto_trainable(config: dict, bases: dict, methods: dict, keys: dict, data: tuple, folds: np.ndarray,
                    task: str, modalities: list[str], seed: int, n_outputs: int, metric: str) -> None:
    """One trial of the per-candidate search: ``config["candidate"]``'s k folds with the trial's params.

    Each fold is the very fit ``train.method=auto`` makes for its leaderboard
    (:func:`raypipe.tune.folds.fold_task`: train on the other folds minus a validation part for
    early stopping, score the untouched held-out fold), so a trial's ``cv_mean`` is what the
    candidate's leaderboard row will show with these params. A report after every fold (ASHA
    can stop a trial early), with the fold scores as a small checkpoint (``Tuner.restore``
    continues a trial at its first unfinished fold).
    """
    import ray.tune

    from raypipe.tune.folds import fold_task

    label = config["candidate"]
    train = apply_train_params(bases[label], {key: config[key] for key in keys[label]})
    k = int(np.max(folds)) + 1
    scores: list[float] = []
    ckpt = ray.tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d, open(os.path.join(d, CV_STATE_FILE)) as fh:
            scores = [float(v) for v in json.load(fh)["fold_scores"]]
    for f in range(len(scores), k):
        t0 = time.perf_counter()
        row = fold_task(methods[label], {}, train, data, f, folds, task, modalities, seed, patterns=False,
                        n_outputs=n_outputs)
        scores.append(float(row.get(metric, np.nan)))
        _report_fold(f, scores, t0)


def search_candidates(cfg: Config, cands: list, data: tuple, folds: np.ndarray, task: str, modalities: list[str],
                      metric: str,
                      higher: bool, n_outputs: int, out_dir: str, time_budget_s: float | None = None,
                      ) -> dict[str, dict]:
    """``train.auto.tune_trials`` > 0: a Ray Tune search of each candidate's hyper-parameters on auto's folds.

    One ``Tuner`` for all candidates: ``candidate`` is a grid dimension and every other key is
    drawn from the search space (:func:`search_space`; ``tune.space`` overrides the defaults,
    ``omnifuse.*`` keys only for omnifuse, :func:`candidate_space_keys`), so each candidate
    gets ``train.auto.tune_trials`` random draws (``tune.search: grid`` multiplies them by the
    grid), 1 CPU per trial, ``tune.scheduler`` (fifo/asha), the draws seeded by ``run.seed``.
    ``data`` is auto's ``(x, mask, y, sample_id, shapes)`` of the cross-validated rows,
    ``folds`` their folds and ``modalities`` the table's modality order. ``time_budget_s``: Tune
    stops the search then; trials without every fold are not used.

    Returns, per candidate label, ``{"params": {key: value}, "cv_mean": ..., "trials": n}`` for
    the complete trial with the best ``cv_mean`` on ``metric`` (ties: the earlier trial), or
    ``{"params": {}, "trials": 0}`` when none completed (the candidate keeps its settings).
    Writes every trial to ``<out_dir>/search.csv``.
    """
    import pandas as pd
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raypipe.runtime import cluster_resources, init_ray

    if cfg.tune.search == "optuna":
        raise ValueError("train.auto.tune_trials searches with tune.search random or grid, not optuna")
    rctx = init_ray(cfg)
    k = int(np.max(folds)) + 1
    labels = [c.label for c in cands]
    keys = {c.label: candidate_space_keys(cfg, c.method) for c in cands}
    space = {"candidate": ray.tune.grid_search(labels), **search_space(cfg)}
    slots = max(1, int(cluster_resources()["CPU"]))
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_auto_trainable, bases={c.label: c.train_cfg for c in cands},
                                 methods={c.label: c.method for c in cands}, keys=keys, data=data,
                                 folds=np.asarray(folds), task=task, modalities=list(modalities), seed=cfg.run.seed,
                                 n_outputs=n_outputs, metric=metric),
        {"CPU": 1.0})
    scheduler = (ASHAScheduler(time_attr="fold", max_t=k, grace_period=1, reduction_factor=2)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    name = f"{cfg.run.name}-auto-search-{search_fingerprint(cfg)}"
    path = os.path.join(rctx.results_dir, name)
    if ray.tune.Tuner.can_restore(path):
        log.info("auto: resuming the interrupted search at %s", path)
        tuner = ray.tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = ray.tune.Tuner(
            trainable, param_space=space,
            tune_config=ray.tune.TuneConfig(metric="cv_mean", mode="max" if higher else "min",
                                            num_samples=cfg.train.auto.tune_trials, scheduler=scheduler,
                                            search_alg=BasicVariantGenerator(random_state=cfg.run.seed),
                                            max_concurrent_trials=cfg.tune.max_concurrent_trials or slots,
                                            reuse_actors=True, time_budget_s=time_budget_s),
            run_config=ray.tune.RunConfig(name=name, storage_path=rctx.results_dir,
                                          verbose=None if console.bars_wanted(cfg) else 0))
    log.info("auto: searching %d candidates x %d trials x %d folds (%s)", len(cands), cfg.train.auto.tune_trials,
             k, ", ".join(sorted({x for v in keys.values() for x in v})))
    grid = tuner.fit()
    all_keys = sorted({x for v in keys.values() for x in v}, key=list(search_space(cfg)).index)
    rows = []
    for r in grid:
        if not r.metrics or "fold_scores" not in r.metrics or r.config.get("candidate") not in keys:
            continue
        label = r.config["candidate"]
        scores = json.loads(r.metrics["fold_scores"])
        trial_id = str(r.metrics.get("trial_id", ""))
        tail = trial_id.rsplit("_", 1)[-1]
        rows.append({"candidate": label, "trial": trial_id,
                     **{x: (_plain(r.config.get(x)) if x in keys[label] else None) for x in all_keys},
                     "cv_mean": r.metrics.get("cv_mean"), "cv_std": r.metrics.get("cv_std"),
                     "folds_done": len(scores), "fold_scores": json.dumps(scores),
                     # trial ids end in the trial's creation index: ties go to the earlier trial
                     "_order": (labels.index(label), int(tail) if tail.isdigit() else 0),
                     "_params": {x: _plain(r.config.get(x)) for x in keys[label]}})
    rows.sort(key=lambda row: row["_order"])
    os.makedirs(out_dir, exist_ok=True)
    pd.DataFrame([{c: v for c, v in row.items() if not c.startswith("_")} for row in rows],
                 columns=["candidate", "trial", *all_keys, "cv_mean", "cv_std", "folds_done", "fold_scores"]
                 ).to_csv(os.path.join(out_dir, AUTO_SEARCH_FILE), index=False)
    out: dict[str, dict] = {}
    for label in labels:
        done = [row for row in rows if row["candidate"] == label and row["folds_done"] == k
                and row["cv_mean"] is not None and np.isfinite(row["cv_mean"])]
        if not done:
            out[label] = {"params": {}, "trials": 0}
            continue
        best = done[0]
        for row in done[1:]:
            if (row["cv_mean"] > best["cv_mean"]) if higher else (row["cv_mean"] < best["cv_mean"]):
                best = row
        out[label] = {"params": best["_params"], "cv_mean": float(best["cv_mean"]), "trial": best["trial"],
                      "trials": len(done)}
    return out


def _plain(v):
    return v.item() if hasattr(v, "item") else v
