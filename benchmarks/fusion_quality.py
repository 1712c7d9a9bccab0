"""Fusion quality: every method on the same folds of embeddings with the laziness structure.

Data: the synthetic clinical cohort's per-modality latent observations
(``raypipe.synth.clinical.generate_truth``, no images), each rendered to a 64-d
embedding-like vector by a fixed seeded map (``raypipe.synth.embeddings``).
Protocol: 5 folds grouped by patient and stratified; inside each training part 20 %
is held out for early stopping; every method gets the same width, epochs, patience,
batch size, learning rate and the same modality-dropout simulation (p = 0.5).

Conditions: (a) complete data (every modality present for every patient);
(b) natural availability (``avail_<m>``) with 50 % random missingness on top (each
available modality dropped with p = 0.5, at least one kept), the same masks for every
method. Prints mean ± std AUROC per method, the paired t-test (scipy.stats.ttest_rel
over folds) of omnifuse against each other row and omnifuse's rank, plus references:
single-modality models (concat on one modality), the OmniFuse ablation rows of the
paper's Table 4, the Bayes AUROC (true probability) and an oracle logistic regression
on the observations' sufficient statistics (it knows the true observation directions
and which site writes clean reports): the most a model of the observations can reach.

    python benchmarks/fusion_quality.py                      # n=1000, 5 folds, <=40 epochs
    python benchmarks/fusion_quality.py --n 400 --epochs 15 --methods omnifuse,concat --no-ablation
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time

import numpy as np
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.registry import REGISTRY, build_method
from raypipe.synth.clinical import generate_truth
from raypipe.synth.embeddings import render_embeddings
from raypipe.synth.latent import MODALITIES, ClinicalParams, observation_directions
from raypipe.train import loop
from raypipe.train.metrics import compute_metrics
from raypipe.train.splits import holdout_mask, kfold_assignments

ABLATIONS = {  # OmniFuse Table 4 rows as config switches (docs/fusion.md); row a is concat, row e is omnifuse
    "b": ("DWFuse", dict(use_imp_forward=False, use_imp_backward=False, use_tla=False)),
    "c": ("DWFuse+TLA", dict(use_imp_forward=False, use_imp_backward=False)),
    "d": ("DWFuse+TLA+IMP fwd", dict(use_imp_backward=False)),
    "f": ("IMP+TLA, no DWFuse", dict(use_dwfuse=False)),
}


def drop_at_random(mask: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Drop each available modality with probability ``rate``, keeping at least one per sample."""
    rng = np.random.default_rng(seed)
    out = mask & (rng.random(mask.shape) >= rate)
    for i in np.flatnonzero(~out.any(axis=1)):  # restore one of the sample's own modalities
        out[i, rng.choice(np.flatnonzero(mask[i]))] = True
    return out


def run_one(name, omni, x, y, mask, train_idx, test_idx, args, seed) -> float:
    """Train ``name`` on ``train_idx`` (20 % of it for early stopping), AUROC on ``test_idx``."""
    specs = [ModalitySpec(m, (x[m].shape[1],)) for m in MODALITIES]
    cfg = TrainConfig(hidden_dim=args.hidden, omnifuse={"depth": args.depth, **omni})
    torch.manual_seed(seed)
    method = build_method(name, specs, "binary", 2, cfg)
    val = holdout_mask(train_idx.astype(str), y[train_idx], fraction=0.2, seed=seed)
    tr, va = train_idx[~val], train_idx[val]
    part = lambda idx: ({m: x[m][idx] for m in MODALITIES}, mask[idx], y[idx])  # noqa: E731
    loop.fit(method, part(tr), part(va), "binary", epochs=args.epochs, batch_size=64, lr=args.lr,
             p_drop=args.p_drop, patience=args.patience, seed=seed)
    predict = loop.make_predict_fn(method, "binary")
    xt, mt, yt = part(test_idx)
    return compute_metrics("binary", yt, predict(xt, mt)["probabilities"])["auroc"]


def oracle_auroc(truth, mask, y, folds, k) -> list[float]:
    """Logistic regression on the sufficient statistics of the observations (projection on each true
    observation direction; the report split by clean/noisy site), zero + indicator where masked."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    dirs = observation_directions(ClinicalParams())
    clean = np.isin(truth["site"].to_numpy(), ClinicalParams().clean_sites).astype(float)
    proj = {m: np.stack(truth[f"obs_{m}"].to_numpy()) @ dirs[m] for m in MODALITIES}
    cols = [proj["ct"], proj["pet"], proj["ehr"], proj["report"] * clean, np.tanh(proj["report"] / 3) * (1 - clean)]
    owner = [0, 1, 2, 3, 3]
    feats = np.stack([c * mask[:, j] for c, j in zip(cols, owner)] + [mask[:, j].astype(float) for j in range(4)], 1)
    out = []
    for f in range(k):
        tr, te = folds != f, folds == f
        clf = LogisticRegression(max_iter=2000).fit(feats[tr], y[tr])
        out.append(float(roc_auc_score(y[te], clf.predict_proba(feats[te])[:, 1])))
    return out


def logistic_auroc(truth, mask, y, folds, k, modalities) -> list[float]:
    """Plain logistic regression on the raw observations of ``modalities`` (standardised; zero and an
    indicator where masked): the model under which the generator's laziness was designed (docs/synthetic.md)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parts = []
    for m in modalities:
        j = MODALITIES.index(m)
        parts += [np.stack(truth[f"obs_{m}"].to_numpy()) * mask[:, [j]], mask[:, [j]].astype(float)]
    feats = np.concatenate(parts, 1)
    out = []
    for f in range(k):
        tr, te = folds != f, folds == f
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats[tr], y[tr])
        out.append(float(roc_auc_score(y[te], clf.predict_proba(feats[te])[:, 1])))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=3, help="R, residual autoencoders per cascade")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--p-drop", type=float, default=0.5, help="training modality-dropout simulation, every method")
    p.add_argument("--missing", type=float, default=0.5, help="condition (b): random missingness on top of natural")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(REGISTRY))
    p.add_argument("--ablation", default="b,c,d", help="OmniFuse ablation rows to add (b,c,d,f; '' for none)")
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--no-single", action="store_true", help="skip the single-modality rows")
    p.add_argument("--json", help="write the raw per-fold numbers here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny models: 1 is fastest)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    truth = generate_truth(n=args.n, seed=args.seed)
    x = render_embeddings(truth, dim=64)
    y = truth["label"].to_numpy().astype(float)
    ids = truth["sample_id"].to_numpy()
    folds = kfold_assignments(ids, y, k=args.folds, seed=args.seed)
    natural = np.stack([truth[f"avail_{m}"].to_numpy() for m in MODALITIES], 1)
    conditions = {"complete": np.ones_like(natural), "missing": drop_at_random(natural, args.missing, args.seed + 99)}
    runs = [(m, m, {}) for m in args.methods.split(",") if m]
    rows = [] if args.no_ablation else [r for r in args.ablation.split(",") if r]
    runs += [(f"omnifuse row {r} ({ABLATIONS[r][0]})", "omnifuse", ABLATIONS[r][1]) for r in rows]
    scores: dict[str, dict[str, list[float]]] = {c: {} for c in conditions}
    from sklearn.metrics import roc_auc_score

    t0 = time.perf_counter()
    for cond, mask in conditions.items():
        scores[cond]["ref: Bayes (true probability)"] = [
            float(roc_auc_score(y[folds == f], truth["prob"].to_numpy()[folds == f])) for f in range(args.folds)]
        scores[cond]["ref: oracle LR on sufficient stats"] = oracle_auroc(truth, mask, y, folds, args.folds)
        scores[cond]["ref: LR on raw obs, ct alone"] = logistic_auroc(truth, mask, y, folds, args.folds, ["ct"])
        scores[cond]["ref: LR on raw obs, all concatenated"] = logistic_auroc(truth, mask, y, folds, args.folds,
                                                                              list(MODALITIES))
        for j, m in enumerate([] if args.no_single else MODALITIES):
            # single modality: concat shown only modality j, on the samples that have it
            only = np.zeros_like(mask)
            only[:, j] = True
            has = mask[:, j]
            for f in range(args.folds):
                tr, te = np.flatnonzero((folds != f) & has), np.flatnonzero((folds == f) & has)
                scores[cond].setdefault(f"only:{m}", []).append(
                    run_one("concat", {}, x, y, only, tr, te, args, args.seed + f))
        for label, name, omni in runs:
            for f in range(args.folds):
                tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
                scores[cond].setdefault(label, []).append(run_one(name, omni, x, y, mask, tr, te, args, args.seed + f))
            print(f"[{time.perf_counter() - t0:6.0f}s] {cond:9s} {label:36s} "
                  f"{np.mean(scores[cond][label]):.3f} ± {np.std(scores[cond][label]):.3f}", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - t0
    print(markdown_table(scores, args, elapsed))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "scores": scores, "seconds": elapsed}, fh, indent=2)


def markdown_table(scores, args, elapsed: float) -> str:
    """The results as a Markdown table (mean ± std over folds, paired t-test p vs omnifuse, ranks)."""
    from scipy.stats import ttest_rel

    conds = list(scores)
    lines = [f"n = {args.n}, {args.folds}-fold CV, AUROC mean ± std over folds; width {args.hidden}, R = {args.depth}, "
             f"<= {args.epochs} epochs (patience {args.patience}), lr {args.lr}, modality dropout p = {args.p_drop}; "
             f"(b) = natural availability + {args.missing:.0%} random missingness. "
             f"{elapsed / 60:.0f} min on {platform.machine()} ({torch.get_num_threads()} torch thread).", "",
             "| method | " + " | ".join(conds) + " | " + " | ".join(f"p vs omnifuse ({c})" for c in conds) + " |",
             "|---|" + "---|" * (2 * len(conds))]
    for label in scores[conds[0]]:
        cells = [f"{np.mean(scores[c][label]):.3f} ± {np.std(scores[c][label]):.3f}" for c in conds]
        pv = []
        for c in conds:
            if label == "omnifuse" or "omnifuse" not in scores[c] or label.startswith(("ref:", "only:")):
                pv.append("-")
            else:
                pv.append(f"{ttest_rel(scores[c]['omnifuse'], scores[c][label]).pvalue:.2g}")
        name = f"**{label}**" if label == "omnifuse" else label
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(pv) + " |")
    lines.append("")
    for c in conds:
        ranked = sorted((k for k in scores[c] if k in REGISTRY), key=lambda k: -np.mean(scores[c][k]))
        if "omnifuse" in ranked:
            lines.append(f"Rank of omnifuse ({c}): {ranked.index('omnifuse') + 1} of {len(ranked)} methods "
                         f"(order: {', '.join(ranked)}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
