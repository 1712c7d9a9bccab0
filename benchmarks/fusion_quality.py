"""Fusion quality: every method on the same folds and the same view-dropout masks, on synthetic or real data.

Data sets (``--dataset``):

- ``synthetic`` (default): the first synthetic clinical cohort's per-modality latent observations
  (``raypipe.synth.latent.generate_truth``, no images), each rendered to a 64-d embedding-like vector by
  a fixed seeded map (``raypipe.synth.embeddings``); natural availability ``avail_<m>``; binary.
- ``synthetic2``: the second generator (``raypipe.synth.latent2``: cross-modal redundancy, a dominant
  modality missing not at random, a slow-to-fit modality), rendered the same way; binary.
- ``breast_cancer``: scikit-learn's Wisconsin diagnostic breast-cancer data (569 tumours, binary),
  split into its three natural views of ten cell-nucleus features each: the *mean*, the *standard
  error* and the *worst* (largest) value over the nuclei of an image. Real data shipped with
  scikit-learn, nothing downloaded.
- ``htad``: the HTAD home-tasks activity data (Garcia-Ceja et al., MMM 2021; 1,386 windows, 7
  activities, multiclass), shipped in the ``multiviewstacking`` pip package: two sensor views, audio
  (36 MFCC features) and wrist accelerometer (16 features). The package does not say which
  participant a window comes from, so folds are stratified but cannot be grouped by person.

Protocol: ``--folds`` folds (stratified; grouped by patient where the data has patients); inside each
training part 20 % is held out for early stopping; every method gets the same width, epochs,
patience, batch size, learning rate and training modality-dropout simulation (``--p-drop``).
OmniFuse's own hyper-parameters are the configuration's defaults (the paper's R = 5, alpha = 0.1,
beta = 0.5, lambda = (1, 10, 0.5)) unless ``--depth`` overrides R.

Conditions: view dropout at each rate of ``--dropout`` (default 0, 50 and 90 %): on top of the natural
availability (real data: every view present), each available view is dropped with that probability,
at least one view kept per sample. The masks are drawn once per rate from a seed and are the same
for every method and every reference (train and test rows alike).

Output: per metric (AUROC; multiclass also accuracy) a Markdown table with mean +- std (ddof = 1)
over folds per condition, the paired t-test (scipy.stats.ttest_rel over folds) of omnifuse against
every other row, and omnifuse's rank; references on the same folds and masks: a logistic regression
on the concatenated views (standardised with the training fold's statistics, absent views
mean-imputed, plus a presence indicator per view), single-view models (``--no-single`` to skip),
the OmniFuse ablation rows of the paper's Table 4, and for the synthetic cohorts the Bayes AUROC
(true probability; v1 also an oracle logistic regression on the sufficient statistics). Then the
fit time per epoch of every method (mean over folds, training + validation pass) and its ratio to
concat's.

    python benchmarks/fusion_quality.py --dataset breast_cancer            # 5 folds, 0/50/90 %
    python benchmarks/fusion_quality.py --dataset htad --epochs 20 --methods omnifuse,concat,late
    python benchmarks/fusion_quality.py --n 400 --epochs 15 --methods omnifuse,concat --no-ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import sklearn.metrics  # noqa: F401  (imported by the metrics on first use: not inside the first fit's timing)
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.registry import REGISTRY, build_method
from raypipe.train import loop
from raypipe.train.metrics import compute_metrics
from raypipe.train.splits import holdout_mask, kfold_assignments

DATASETS = ("synthetic", "synthetic2", "breast_cancer", "htad")

ABLATIONS = {  # OmniFuse Table 4 rows as config switches (docs/fusion.md); row a is concat, row e is omnifuse
    "b": ("DWFuse", dict(use_imp_forward=False, use_imp_backward=False, use_tla=False)),
    "c": ("DWFuse+TLA", dict(use_imp_forward=False, use_imp_backward=False)),
    "d": ("DWFuse+TLA+IMP fwd", dict(use_imp_backward=False)),
    "f": ("IMP+TLA, no DWFuse", dict(use_dwfuse=False)),
}


# ----------------------------------------------------------------------------- data sets
@dataclass
class MultiViewData:
    """One data set as the benchmark needs it: views, labels, natural availability, groups."""

    name: str
    views: dict[str, np.ndarray]  # view name -> (N, d) float32
    y: np.ndarray  # (N,) labels 0..K-1
    task: str  # binary | multiclass
    natural: np.ndarray  # (N, M) bool: which views exist for each sample before any dropout
    ids: np.ndarray  # sample ids (str)
    groups: np.ndarray | None = None  # patient (or other) ids for grouped folds; None = one per sample
    description: str = ""
    #: extra reference rows: label -> fn(mask, folds, k) -> per-fold scores {metric: [..]}
    references: dict[str, Callable] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.views)

    @property
    def n_classes(self) -> int:
        return int(self.y.max()) + 1


def _subsample(n_total: int, y: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Row indices: all rows, or a seeded stratified subsample of ``n`` (for quick runs and tests)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(n_total), train_size=n, stratify=y, random_state=seed)
    return np.sort(keep)


def _from_truth(name: str, truth, modalities, description: str) -> MultiViewData:
    from raypipe.synth import latent
    from raypipe.synth.embeddings import render_embeddings

    if tuple(modalities) != tuple(latent.MODALITIES):
        raise SystemExit(f"--dataset {name}: its modalities {tuple(modalities)} differ from the embedding "
                         f"renderer's {tuple(latent.MODALITIES)}; raypipe.synth.embeddings must learn them first")
    views = render_embeddings(truth, dim=64)
    y = truth["label"].to_numpy().astype(np.int64)
    natural = np.stack([truth[f"avail_{m}"].to_numpy().astype(bool) for m in modalities], 1)
    refs = {"ref: Bayes (true probability)": _bayes_reference(truth)}
    return MultiViewData(name, {m: views[m] for m in modalities}, y, "binary", natural,
                         truth["sample_id"].to_numpy().astype(str), truth["patient_id"].to_numpy().astype(str)
                         if "patient_id" in truth else None, description, refs)


def load_synthetic(n: int | None, seed: int) -> MultiViewData:
    from raypipe.synth.latent import MODALITIES, generate_truth

    truth = generate_truth(n=n or 1000, seed=seed)
    data = _from_truth("synthetic", truth, MODALITIES, "synthetic clinical cohort v1 (raypipe.synth.latent), "
                       "64-d rendered embeddings, natural availability")
    data.references["ref: oracle LR on sufficient stats"] = _oracle_reference(truth)
    return data


def load_synthetic2(n: int | None, seed: int) -> MultiViewData:
    import importlib

    try:
        latent2 = importlib.import_module("raypipe.synth.latent2")
    except ImportError as exc:
        raise SystemExit("--dataset synthetic2 needs the second synthetic generator, raypipe.synth.latent2 "
                         f"(generate_truth(n, seed) and MODALITIES); this checkout does not have it ({exc})") from None
    for attr in ("generate_truth", "MODALITIES"):
        if not hasattr(latent2, attr):
            raise SystemExit(f"--dataset synthetic2: raypipe.synth.latent2 has no {attr}; it must provide "
                             "generate_truth(n, seed) and MODALITIES")
    truth = latent2.generate_truth(n=n or getattr(latent2, "DEFAULT_N", 1000), seed=seed)
    return _from_truth("synthetic2", truth, latent2.MODALITIES, "synthetic clinical cohort v2 "
                       "(raypipe.synth.latent2), 64-d rendered embeddings, natural availability")


#: breast-cancer views: scikit-learn's feature names are "<feature>", "<feature> error", "worst <feature>"
BREAST_CANCER_VIEWS = {"mean": lambda f: f.startswith("mean "), "se": lambda f: f.endswith(" error"),
                       "worst": lambda f: f.startswith("worst ")}


def load_breast_cancer(n: int | None, seed: int) -> MultiViewData:
    from sklearn.datasets import load_breast_cancer as sk_load

    bunch = sk_load()
    names = [str(f) for f in bunch.feature_names]
    rows = _subsample(len(bunch.target), bunch.target, n, seed)
    views = {}
    for view, belongs in BREAST_CANCER_VIEWS.items():
        cols = [i for i, f in enumerate(names) if belongs(f)]
        views[view] = bunch.data[np.ix_(rows, cols)].astype(np.float32)
    if sum(v.shape[1] for v in views.values()) != len(names):
        raise RuntimeError("breast_cancer: the three views do not partition scikit-learn's 30 features")
    y = bunch.target[rows].astype(np.int64)
    return MultiViewData("breast_cancer", views, y, "binary", np.ones((len(rows), 3), dtype=bool),
                         np.array([f"bc_{i:04d}" for i in rows]), None,
                         "scikit-learn breast cancer (WDBC), views: mean / standard error / worst of 10 nucleus features")


def load_htad(n: int | None, seed: int) -> MultiViewData:
    try:
        import importlib.resources

        import pandas as pd

        with importlib.resources.files("multiviewstacking").joinpath("data/htad.csv").open("rb") as fh:
            df = pd.read_csv(fh, encoding="latin-1")
    except ModuleNotFoundError:
        raise SystemExit("--dataset htad needs the multiviewstacking package (it ships the HTAD data): "
                         "pip install 'multiviewstacking>=0.7' (Python >= 3.11), or pip install -e '.[dev]'") from None
    classes = sorted(df["class"].unique())
    y_all = df["class"].map({c: i for i, c in enumerate(classes)}).to_numpy().astype(np.int64)
    rows = _subsample(len(df), y_all, n, seed)
    audio = [c for c in df.columns if c.startswith("v1_")]
    accel = [c for c in df.columns if c.startswith("v2_")]
    views = {"audio": df[audio].to_numpy()[rows].astype(np.float32),
             "accelerometer": df[accel].to_numpy()[rows].astype(np.float32)}
    return MultiViewData("htad", views, y_all[rows], "multiclass", np.ones((len(rows), 2), dtype=bool),
                         np.array([f"htad_{i:05d}" for i in rows]), None,
                         f"HTAD (multiviewstacking package): audio {len(audio)} MFCC + accelerometer {len(accel)} "
                         f"features, {len(classes)} activities; folds not grouped by participant (unknown)")


LOADERS = {"synthetic": load_synthetic, "synthetic2": load_synthetic2, "breast_cancer": load_breast_cancer,
           "htad": load_htad}


def load_dataset(name: str, n: int | None = None, seed: int = 0) -> MultiViewData:
    """The data set ``name`` (one of :data:`DATASETS`); ``n`` subsamples (synthetic: cohort size)."""
    if name not in LOADERS:
        raise SystemExit(f"unknown --dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return LOADERS[name](n, seed)


# ----------------------------------------------------------------------------- masks and folds
def drop_at_random(mask: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Drop each available view with probability ``rate``, keeping at least one per sample."""
    rng = np.random.default_rng(seed)
    out = mask & (rng.random(mask.shape) >= rate)
    for i in np.flatnonzero(~out.any(axis=1)):  # restore one of the sample's own views
        out[i, rng.choice(np.flatnonzero(mask[i]))] = True
    return out


def make_conditions(data: MultiViewData, rates, seed: int) -> dict[str, np.ndarray]:
    """{"drop 50%": mask} per rate: natural availability with seeded view dropout on top, one mask per
    rate shared by every method (rate 0 = the natural availability itself)."""
    out = {}
    for r in rates:
        label = f"drop {round(100 * r)}%"
        out[label] = data.natural.copy() if r == 0 else drop_at_random(data.natural, r, seed + 99 + round(1000 * r))
    return out


def make_folds(data: MultiViewData, k: int, seed: int) -> np.ndarray:
    return kfold_assignments(data.ids, data.y, groups=data.groups, k=k, seed=seed)


# ----------------------------------------------------------------------------- one fit
def run_one(name: str, omni: dict, data: MultiViewData, mask: np.ndarray, train_idx: np.ndarray,
            test_idx: np.ndarray, args, seed: int, return_probabilities: bool = False) -> dict:
    """Train ``name`` on ``train_idx`` (20 % of it held out for early stopping), score ``test_idx``.

    Returns the task's metrics plus ``seconds_per_epoch`` (wall time of training + validation pass,
    mean over the epochs run), ``cpu_seconds_per_epoch`` (this process's CPU time per epoch, fit
    overheads included) and ``epochs``; with ``return_probabilities`` also ``probabilities`` (the
    test rows' predicted class probabilities, an array: for callers, not for the JSON).
    """
    specs = [ModalitySpec(m, (data.views[m].shape[1],)) for m in data.modalities]
    # --set overrides first, the row's own switches (ablation, variant) on top
    omni_cfg = {**omnifuse_overrides(args), **omni}
    if args.depth is not None:
        omni_cfg["depth"] = args.depth
    cfg = TrainConfig(hidden_dim=args.hidden, omnifuse=omni_cfg)
    torch.manual_seed(seed)
    method = build_method(name, specs, data.task, data.n_classes, cfg)
    val = holdout_mask(data.ids[train_idx], data.y[train_idx],
                       None if data.groups is None else data.groups[train_idx], fraction=0.2, seed=seed)
    tr, va = train_idx[~val], train_idx[val]
    part = lambda idx: ({m: data.views[m][idx] for m in data.modalities}, mask[idx], data.y[idx].astype(float))  # noqa: E731
    cpu0 = time.thread_time()
    res = loop.fit(method, part(tr), part(va), data.task, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, p_drop=args.p_drop, patience=args.patience, seed=seed)
    cpu = time.thread_time() - cpu0
    predict = loop.make_predict_fn(method, data.task)
    xt, mt, yt = part(test_idx)
    prob = np.asarray(predict(xt, mt)["probabilities"])
    out = compute_metrics(data.task, yt, prob)
    if return_probabilities:
        out["probabilities"] = prob
    out["seconds_per_epoch"] = float(np.mean([h["seconds"] for h in res["history"]]))
    # CPU seconds of the thread that trains (torch runs its ops there with 1 intra-op thread): far less
    # sensitive than wall time to other jobs' load on a shared machine
    out["cpu_seconds_per_epoch"] = cpu / max(len(res["history"]), 1)
    out["epochs"] = len(res["history"])
    return out


# ----------------------------------------------------------------------------- references
def _lr_features(data: MultiViewData, mask: np.ndarray, train: np.ndarray, modalities) -> np.ndarray:
    """Per view: standardised with the training rows' statistics (present rows only), absent views
    mean-imputed (0 after standardising), plus a presence indicator."""
    parts = []
    for m in modalities:
        j = data.modalities.index(m)
        v = data.views[m].astype(np.float64)
        seen = train & mask[:, j]
        mu = v[seen].mean(0) if seen.any() else np.zeros(v.shape[1])
        sd = v[seen].std(0) if seen.sum() > 1 else np.ones(v.shape[1])
        z = (v - mu) / np.where(sd > 0, sd, 1.0)
        parts += [z * mask[:, [j]], mask[:, [j]].astype(float)]
    return np.concatenate(parts, 1)


def logistic_reference(data: MultiViewData, mask: np.ndarray, folds: np.ndarray, k: int,
                       modalities=None) -> list[dict]:
    """Logistic regression on the concatenated views (see :func:`_lr_features`), per fold."""
    from sklearn.linear_model import LogisticRegression

    out = []
    for f in range(k):
        tr, te = folds != f, folds == f
        feats = _lr_features(data, mask, tr, modalities or data.modalities)
        clf = LogisticRegression(max_iter=3000).fit(feats[tr], data.y[tr])
        out.append(compute_metrics(data.task, data.y[te].astype(float), clf.predict_proba(feats[te])))
    return out


def _bayes_reference(truth) -> Callable:
    def fn(data, mask, folds, k):
        from raypipe.train.metrics import compute_metrics as cm

        p = truth["prob"].to_numpy()
        return [cm("binary", data.y[folds == f].astype(float), np.stack([1 - p, p], 1)[folds == f]) for f in range(k)]

    return fn


def _oracle_reference(truth) -> Callable:
    """v1 only: logistic regression on the sufficient statistics of the observations (projection on
    each true observation direction; the report split by clean/noisy site), zero + indicator where masked."""
    def fn(data, mask, folds, k):
        from sklearn.linear_model import LogisticRegression

        from raypipe.synth.latent import MODALITIES, ClinicalParams, observation_directions

        dirs = observation_directions(ClinicalParams())
        clean = np.isin(truth["site"].to_numpy(), ClinicalParams().clean_sites).astype(float)
        proj = {m: np.stack(truth[f"obs_{m}"].to_numpy()) @ dirs[m] for m in MODALITIES}
        cols = [proj["ct"], proj["pet"], proj["ehr"], proj["report"] * clean, np.tanh(proj["report"] / 3) * (1 - clean)]
        owner = [0, 1, 2, 3, 3]
        feats = np.stack([c * mask[:, j] for c, j in zip(cols, owner)] + [mask[:, j].astype(float) for j in range(4)], 1)
        out = []
        for f in range(k):
            tr, te = folds != f, folds == f
            clf = LogisticRegression(max_iter=2000).fit(feats[tr], data.y[tr])
            out.append(compute_metrics("binary", data.y[te].astype(float), clf.predict_proba(feats[te])))
        return out

    return fn


# ----------------------------------------------------------------------------- the benchmark
def plan_runs(args) -> list[tuple[str, str, dict]]:
    """(row label, registry name, omnifuse overrides) for the methods and the ablation rows."""
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    runs = [(m, m, {}) for m in methods]
    rows = [] if args.no_ablation else [r for r in args.ablation.split(",") if r]
    runs += [(f"omnifuse row {r} ({ABLATIONS[r][0]})", "omnifuse", ABLATIONS[r][1]) for r in rows]
    runs += [(f"omnifuse variant {label}", "omnifuse", switches) for label, switches in parse_variants(args)]
    return runs


def _parse_value(text: str):
    """JSON scalars (numbers, true/false, null), else the plain string (e.g. reliability)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def omnifuse_overrides(args) -> dict:
    """``--set omnifuse.KEY=VALUE`` (also ``train.omnifuse.KEY``) as an OmniFuseConfig override dict, applied to
    omnifuse and to its ablation and variant rows (their own switches win)."""
    out = {}
    for item in getattr(args, "set", None) or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        for prefix in ("train.omnifuse.", "omnifuse."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            raise SystemExit(f"--set {item!r}: only omnifuse.KEY=VALUE (or train.omnifuse.KEY=VALUE) is supported")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected omnifuse.KEY=VALUE")
        out[key] = _parse_value(value.strip())
    if out:
        from raypipe.config import OmniFuseConfig

        try:  # fail before hours of fitting, with the configuration's own message
            OmniFuseConfig(**out)
        except Exception as exc:  # pydantic's ValidationError names the field and the allowed values
            raise SystemExit(f"--set: {exc}") from None
    return out


def parse_variants(args) -> list[tuple[str, dict]]:
    """``--variant LABEL:KEY=VALUE[,KEY=VALUE]``: an extra omnifuse row with these OmniFuseConfig switches
    (on top of ``--set``), shown as "omnifuse variant LABEL"."""
    out = []
    for item in getattr(args, "variant", None) or []:
        label, sep, body = item.partition(":")
        if not sep or not label.strip():
            raise SystemExit(f"--variant {item!r}: expected LABEL:KEY=VALUE[,KEY=VALUE]")
        switches = {}
        for kv in filter(None, (p.strip() for p in body.split(","))):
            k, eq, v = kv.partition("=")
            if not eq:
                raise SystemExit(f"--variant {item!r}: {kv!r} is not KEY=VALUE")
            switches[k.strip()] = _parse_value(v.strip())
        from raypipe.config import OmniFuseConfig

        try:
            OmniFuseConfig(**{**omnifuse_overrides(args), **switches})
        except Exception as exc:
            raise SystemExit(f"--variant {item!r}: {exc}") from None
        out.append((label.strip(), switches))
    return out


def run_benchmark(data: MultiViewData, conditions: dict[str, np.ndarray], folds: np.ndarray, runs, args,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
                  on_row: Callable[[dict], None] | None = None) -> dict:
    """scores[condition][row] = list over folds of metric dicts (plus seconds_per_epoch for trained rows);
    ``on_row(scores)`` after every finished trained row (``--json`` saves there, so a run stopped early keeps
    the rows it finished)."""
    k = int(folds.max()) + 1
    scores: dict[str, dict[str, list[dict]]] = {c: {} for c in conditions}
    # one untimed fit of every method first: one-off costs (lazy imports, first-call initialisation)
    # must not land in the first timed fit's per-epoch time
    warm = argparse.Namespace(**{**vars(args), "epochs": 1})
    idx = np.concatenate([np.flatnonzero(data.y == c)[:10] for c in range(data.n_classes)])
    for _, name, omni in runs:
        run_one(name, omni, data, data.natural, idx, idx, warm, args.seed)
    t0 = time.perf_counter()
    for cond, mask in conditions.items():
        for label, fn in data.references.items():
            scores[cond][label] = fn(data, mask, folds, k)
        scores[cond]["ref: logistic regression, all views"] = logistic_reference(data, mask, folds, k)
        for m in ([] if args.no_single else data.modalities):
            j = data.modalities.index(m)
            only = np.zeros_like(mask)
            only[:, j] = True
            rows = []
            for f in range(k):  # single view: concat shown view m alone, on the samples that have it
                tr = np.flatnonzero((folds != f) & mask[:, j])
                te = np.flatnonzero((folds == f) & mask[:, j])
                rows.append(run_one("concat", {}, data, only, tr, te, args, args.seed + f))
            scores[cond][f"only:{m}"] = rows
        for label, name, omni in runs:
            rows = []
            for f in range(k):
                tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
                rows.append(run_one(name, omni, data, mask, tr, te, args, args.seed + f))
            scores[cond][label] = rows
            main = _main(data.task)
            vals = [r[main] for r in rows]
            log(f"[{time.perf_counter() - t0:6.0f}s] {cond:9s} {label:36s} {main} {np.mean(vals):.3f} "
                f"+- {_sd(vals):.3f}  {np.mean([r['seconds_per_epoch'] for r in rows]):.3f} s/epoch")
            if on_row:
                on_row(scores)
    return scores


def _main(task: str) -> str:
    return "auroc"


def _sd(values) -> float:
    """Sample standard deviation (ddof = 1) over folds; nan for fewer than two values."""
    v = np.asarray(values, dtype=float)
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def table_metrics(task: str) -> list[str]:
    return ["auroc", "accuracy"] if task == "multiclass" else ["auroc"]


def metric_table(scores: dict, metric: str) -> list[str]:
    """Markdown rows: method | mean +- std per condition | paired t-test p vs omnifuse per condition."""
    from scipy.stats import ttest_rel

    conds = list(scores)
    lines = ["| method | " + " | ".join(conds) + " | " + " | ".join(f"p vs omnifuse ({c})" for c in conds) + " |",
             "|---|" + "---|" * (2 * len(conds))]
    for label in dict.fromkeys(k for c in conds for k in scores[c]):
        cells, pv = [], []
        for c in conds:
            if label not in scores[c]:  # a merged run that did not reach this row for this condition
                cells.append("not run")
                pv.append("-")
                continue
            vals = [r.get(metric, np.nan) for r in scores[c][label]]
            cells.append(f"{np.mean(vals):.3f} ± {_sd(vals):.3f}")
            if label == "omnifuse" or "omnifuse" not in scores[c] or label.startswith("only:") or "Bayes" in label:
                pv.append("-")
            else:
                ref = [r.get(metric, np.nan) for r in scores[c]["omnifuse"]]
                p = ttest_rel(ref, vals).pvalue if len(vals) > 1 else np.nan
                pv.append("-" if np.isnan(p) else f"{p:.2g}")
        name = f"**{label}**" if label == "omnifuse" else label
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(pv) + " |")
    lines.append("")
    for c in conds:
        ranked = sorted((k for k in scores[c] if k in REGISTRY),
                        key=lambda k: -np.mean([r.get(metric, np.nan) for r in scores[c][k]]))
        if "omnifuse" in ranked:
            lines.append(f"Rank of omnifuse by {metric} ({c}): {ranked.index('omnifuse') + 1} of {len(ranked)} methods "
                         f"(order: {', '.join(ranked)}).")
    return lines


#: rows written by benchmarks/fusion_quality_auto.py
AUTO_ROW, ENSEMBLE_ROW = "auto", "auto ensemble"


def _is_single_method(label: str) -> bool:
    """A trained single method: a registered method or an OmniFuse ablation row (not a reference, a
    single-view row, or auto's choice / ensemble)."""
    return label in REGISTRY or label.startswith("omnifuse row ")


def goal_checks(scores: dict, metric: str) -> list[str]:
    """Plain-text lines per condition: omnifuse (row e) >= concat and >= row b (with paired p), and, where the
    auto rows exist, auto's mean against the best single method's mean minus its fold-std, and the ensemble's
    against its best member's (members: the auto candidates, as listed in the auto rows)."""
    from scipy.stats import ttest_rel

    lines = []
    vals = lambda c, k: np.array([r.get(metric, np.nan) for r in scores[c][k]], dtype=float)  # noqa: E731
    row_b = next((k for k in scores[next(iter(scores))] if k.startswith("omnifuse row b")), None)
    for c in scores:
        if "omnifuse" in scores[c]:
            e = vals(c, "omnifuse")
            parts = []
            for other in ("concat", row_b):
                if other and other in scores[c]:
                    o = vals(c, other)
                    p = ttest_rel(e, o).pvalue if len(e) > 1 else np.nan
                    parts.append(f"{'>=' if e.mean() >= o.mean() else '<'} {other.split(' (')[0]} "
                                 f"({e.mean():.3f} vs {o.mean():.3f}, diff {e.mean() - o.mean():+.3f}, p = {p:.2g})")
            lines.append(f"- {c}: omnifuse " + "; ".join(parts) + ".")
        if AUTO_ROW in scores[c]:
            singles = [k for k in scores[c] if _is_single_method(k)]
            best = max(singles, key=lambda k: vals(c, k).mean())
            b, a = vals(c, best), vals(c, AUTO_ROW)
            ok = a.mean() >= b.mean() - _sd(b)
            lines.append(f"- {c}: auto {a.mean():.3f} vs best single method {best} {b.mean():.3f} ± {_sd(b):.3f}: "
                         f"{'within' if ok else 'NOT within'} one fold-std (diff {a.mean() - b.mean():+.3f}).")
        if ENSEMBLE_ROW in scores[c]:
            members = scores[c][ENSEMBLE_ROW][0].get("candidates", [])
            members = [k for k in members if k in scores[c]]
            if members:
                best = max(members, key=lambda k: vals(c, k).mean())
                b, en = vals(c, best), vals(c, ENSEMBLE_ROW)
                ok = en.mean() >= b.mean() - _sd(b)
                lines.append(f"- {c}: ensemble {en.mean():.3f} vs its best member {best} {b.mean():.3f} ± {_sd(b):.3f}: "
                             f"{'within' if ok else 'NOT within'} one fold-std (diff {en.mean() - b.mean():+.3f}).")
    return lines


def timing_table(scores: dict) -> list[str]:
    """Fit time per epoch (mean over folds) per trained row and condition, in CPU seconds of the process
    and in wall seconds, and the CPU-time ratio to concat."""
    conds = list(scores)
    trained = [k for k in dict.fromkeys(k for c in conds for k in scores[c])
               if any(k in scores[c] and "seconds_per_epoch" in scores[c][k][0] for c in conds)]
    lines = ["| method | " + " | ".join(f"CPU s/epoch ({c})" for c in conds) + " | x concat (CPU, mean) | "
             "wall s/epoch (mean) | epochs run (mean) |",
             "|---|" + "---|" * (len(conds) + 3)]

    def cpu(label, c):
        if label not in scores[c]:
            return np.nan
        return np.mean([r.get("cpu_seconds_per_epoch", r["seconds_per_epoch"]) for r in scores[c][label]])

    base = np.nanmean([cpu("concat", c) for c in conds]) if "concat" in trained else None
    for label in trained:
        per = [cpu(label, c) for c in conds]
        ratio = f"{np.nanmean(per) / base:.1f}" if base else "-"
        wall = np.mean([r["seconds_per_epoch"] for c in conds if label in scores[c] for r in scores[c][label]])
        epochs = np.mean([r["epochs"] for c in conds if label in scores[c] for r in scores[c][label]])
        lines.append(f"| {label} | " + " | ".join("not run" if np.isnan(s) else f"{s:.3f}" for s in per)
                     + f" | {ratio} | {wall:.3f} | {epochs:.1f} |")
    return lines


def machine_description() -> str:
    """CPU model and visible core count (the timings depend on them)."""
    import os

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores visible)"


def markdown_report(data: MultiViewData, scores: dict, conditions: dict, args, elapsed: float,
                    command: str | None = None) -> str:
    conds = list(scores)
    k = len(next(iter(scores[conds[0]].values())))
    realised = "; views actually dropped (of those naturally present): " + ", ".join(
        f"{c} {1 - conditions[c].sum() / max(data.natural.sum(), 1):.0%}" for c in conds)
    head = [f"Data: {data.description}; n = {len(data.y)}, {len(data.modalities)} views "
            f"({', '.join(f'{m} {data.views[m].shape[1]}-d' for m in data.modalities)}), task {data.task}"
            f"{f' ({data.n_classes} classes)' if data.task == 'multiclass' else ''}.",
            f"{k}-fold CV, mean ± std (ddof = 1) over folds; p = paired t-test over folds vs omnifuse. Width "
            f"{args.hidden}, OmniFuse R = {args.depth if args.depth is not None else TrainConfig().omnifuse.depth} "
            f"(other OmniFuse settings: {_overrides_text(args)}), <= {args.epochs} epochs (patience "
            f"{args.patience}), batch {args.batch_size}, lr {args.lr}, training modality dropout p = {args.p_drop}. "
            f"Conditions: view dropout at the named rate on top of the natural availability, same masks for every "
            f"row{realised}. {elapsed / 60:.1f} min of run time on {machine_description()}, "
            f"{getattr(args, 'threads', 1)} torch thread(s) per process.",
            ]
    if command:
        head.append(f"Command: `{command}`")
    out = head + [""]
    for metric in table_metrics(data.task):
        out += [f"**{metric}**", ""] + metric_table(scores, metric) + [""]
    checks = goal_checks(scores, _main(data.task))
    if checks:
        out += [f"**checks** ({_main(data.task)}; issue 14: omnifuse row e against concat and row b; issue 18: "
                "auto within one fold-std (ddof = 1) of the best single method, the ensemble within one fold-std of "
                "its best member)", ""] + checks + [""]
    out += ["**fit time per epoch** (training pass + validation pass + the method's epoch hooks; CPU seconds of "
            "the training thread (1 torch thread), and wall seconds, which other jobs on a shared machine inflate)", ""]
    out += timing_table(scores)
    return "\n".join(out)


def _overrides_text(args) -> str:
    sets = omnifuse_overrides(args)
    if not sets:
        return "the configuration's defaults"
    return "the configuration's defaults except " + ", ".join(f"{k} = {v}" for k, v in sets.items()) + \
        " (--set, on omnifuse and its ablation rows)"


def build_parser() -> argparse.ArgumentParser:
    """The command line (also used by benchmarks/fusion_quality_auto.py, so its runs carry the same settings)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="which data (see above)")
    p.add_argument("--n", type=int, default=None,
                   help="synthetic: cohort size (default: the generator's, 1000); real data: a stratified "
                        "subsample of this many rows (default: all)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--dropout", default="0,0.5,0.9", help="view-dropout rates of the conditions (comma list)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=None, help="override R (default: the configuration's, the paper's 5)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--p-drop", type=float, default=0.5, help="training modality-dropout simulation, every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(REGISTRY), help="comma list of registered methods")
    p.add_argument("--ablation", default="b,c,d", help="OmniFuse ablation rows to add (b,c,d,f; '' for none)")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="omnifuse.KEY=VALUE",
                   help="an OmniFuseConfig override for omnifuse and its ablation/variant rows (repeatable), e.g. "
                        "--set omnifuse.joint_skip=true; recorded in the --json args and the report header")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,KEY=VALUE]",
                   help="an extra omnifuse row with its own switches (repeatable), e.g. "
                        "--variant skip:joint_skip=true")
    p.add_argument("--no-single", action="store_true", help="skip the single-view rows")
    p.add_argument("--json", help="write the raw per-fold numbers here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="print the report from --json files of earlier runs instead of running (e.g. one run per "
                        "dropout rate in parallel, merged here); the data set and settings come from the files")
    return p


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    if args.from_json:
        return report_from_json(args.from_json)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        rates = [float(r) for r in args.dropout.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--dropout: comma-separated rates in [0, 1), got {args.dropout!r}") from None
    if not rates or any(not 0 <= r < 1 for r in rates):
        raise SystemExit(f"--dropout: rates must lie in [0, 1), got {args.dropout!r}")

    data = load_dataset(args.dataset, args.n, args.seed)
    folds = make_folds(data, args.folds, args.seed)
    conditions = make_conditions(data, rates, args.seed)
    runs = plan_runs(args)
    started = run_context()  # code version and load when the code was imported and the run began
    command = "python benchmarks/fusion_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()

    def save(scores, complete=False):
        if args.json:
            with open(args.json + ".tmp", "w") as fh:
                json.dump({"args": vars(args), "dataset": data.name, "scores": scores,
                           "seconds": time.perf_counter() - t0, "command": command, "context": started,
                           "complete": complete}, fh, indent=2)
            import os

            os.replace(args.json + ".tmp", args.json)

    scores = run_benchmark(data, conditions, folds, runs, args, on_row=save)
    elapsed = time.perf_counter() - t0
    print(markdown_report(data, scores, conditions, args, elapsed, command))
    save(scores, complete=True)
    return scores


def run_context() -> dict:
    """When, on what load and on which code a run started: UTC time, 1-min load average, git HEAD and the
    files under raypipe/ and benchmarks/ that differ from it (a shared working tree may hold others'
    uncommitted edits; the modules were imported before this is called)."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load1": round(load, 1),
            "head": git("rev-parse", "--short", "HEAD"),
            "dirty": [ln[3:] for ln in git("status", "--porcelain", "--", "raypipe", "benchmarks").splitlines()
                      if ln[3:].endswith(".py")]}


#: settings that may differ between the --json files merged by --from-json (they select rows or conditions)
_MERGEABLE = ("dropout", "json", "methods", "ablation", "no_ablation", "no_single", "from_json", "variant", "set")
#: options added after some --json files were written: their value in such a file is the default
_LATER_DEFAULTS = {"set": [], "variant": []}


def report_from_json(paths) -> dict:
    """Merge several ``--json`` files (same data set and training settings; each may hold other conditions
    or other rows, e.g. one process per dropout rate and method group) and print the report."""
    runs = []
    for path in paths:
        with open(path) as fh:
            runs.append(json.load(fh))
    for r in runs:
        for k, v in _LATER_DEFAULTS.items():
            r["args"].setdefault(k, v)
    same = lambda r: {k: v for k, v in r["args"].items() if k not in _MERGEABLE}  # noqa: E731
    # --set changes only OmniFuse rows: files without any may differ (e.g. other methods run separately)
    omni_sets = {json.dumps(sorted(r["args"]["set"])) for r in runs
                 if any(label.startswith("omnifuse") for c in r["scores"].values() for label in c)}
    if len(omni_sets) > 1:
        raise SystemExit(f"--from-json: the files' OmniFuse rows were run with different --set overrides: {paths}")
    if any(same(r) != same(runs[0]) for r in runs[1:]):
        raise SystemExit(f"--from-json: the files were run with different settings: {paths}")
    first = argparse.Namespace(**runs[0]["args"])
    first.set = json.loads(omni_sets.pop()) if omni_sets else []
    scores, replaced = merge_scores([r["scores"] for r in runs])
    for c, label, i in replaced:
        if label.startswith(("ref:", "only:")):  # references are recomputed by every run, identically
            continue
        print(f"--from-json: {c} / {label}: taken from {paths[i]} (replaces an earlier file's row)", file=sys.stderr)
    data = load_dataset(first.dataset, first.n, first.seed)
    rates = [float(c.split()[1].rstrip("%")) / 100 for c in scores]
    order = sorted(range(len(rates)), key=lambda i: rates[i])
    scores = {list(scores)[i]: scores[list(scores)[i]] for i in order}
    conditions = make_conditions(data, sorted(rates), first.seed)
    if list(conditions) != list(scores):
        raise SystemExit(f"--from-json: unexpected condition names {list(scores)}")
    labels = list(dict.fromkeys(k for c in scores for k in scores[c]))
    missing = [(c, k) for c in scores for k in labels if k not in scores[c]]
    if missing:  # e.g. a run stopped early: shown as "not run" cells
        print(f"--from-json: rows not run for some conditions: {missing}", file=sys.stderr)
    refs = [k for k in labels if k.startswith(("ref:", "only:"))]
    labels = refs + [k for k in labels if k not in refs]
    scores = {c: {k: scores[c][k] for k in labels if k in scores[c]} for c in scores}
    elapsed = sum(r["seconds"] for r in runs)
    commands = "; ".join(r.get("command", "?") for r in runs)
    print(markdown_report(data, scores, conditions, first, elapsed, commands))
    contexts = [(p, r["context"]) for p, r in zip(paths, runs) if "context" in r]
    if contexts:
        print("\nRuns (start UTC, 1-min load average, code: git HEAD + files differing from it):\n")
        for p, c in contexts:
            print(f"- `{p}`: {c['utc']}, load {c['load1']}, {c['head']}"
                  f"{' + uncommitted ' + ', '.join(c['dirty']) if c['dirty'] else ''}")
    return scores


def merge_scores(parts: list[dict]) -> tuple[dict, list[tuple[str, str, int]]]:
    """Merge the ``scores`` of several runs: conditions are united, and a row (condition, label) present in
    several parts is taken from the LAST part that has it (so a re-run of some methods replaces their rows
    by listing its file after the first run's). Returns (merged scores, [(condition, label, index of the
    part it was taken from)] for every row that replaced an earlier one)."""
    scores: dict[str, dict[str, list]] = {}
    replaced = []
    for i, part in enumerate(parts):
        for c, rows in part.items():
            into = scores.setdefault(c, {})
            for label, per_fold in rows.items():
                if label in into:
                    replaced.append((c, label, i))
                into[label] = per_fold
    return scores, replaced


if __name__ == "__main__":
    main()
