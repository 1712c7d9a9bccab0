"""Fusion quality: every method on the same folds of embeddings with the laziness structure.

The synthetic clinical cohort's per-modality latent observations (truth.parquet, no
images) are rendered as 64-d embeddings (raypipe.synth.embeddings). 5 folds grouped by
patient, stratified; per fold a validation part of the training folds drives early
stopping; every method gets the same epochs, batch size, learning rate and width.
Two conditions: (a) complete data (every modality present), (b) 50 % random missingness
on top of complete data (each modality dropped with p = 0.5, at least one kept), the
same masks for every method. Prints mean ± std AUROC per method and the paired t-test
(scipy.stats.ttest_rel over folds) of omnifuse against each other method, plus the
unimodal references (concat on a single modality) and the ablation rows.

    python benchmarks/fusion_quality.py                 # default: n=1000, 5 folds, 40 epochs
    python benchmarks/fusion_quality.py --n 400 --epochs 15 --methods omnifuse,concat
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.registry import REGISTRY, build_method
from raypipe.synth.embeddings import render_embeddings
from raypipe.synth.latent import MODALITIES, generate_truth
from raypipe.train import loop
from raypipe.train.evaluate import simulate_missing
from raypipe.train.metrics import compute_metrics
from raypipe.train.splits import holdout_mask, kfold_assignments

ABLATIONS = {  # OmniFuse Table 4 rows as config switches
    "b:dwfuse": dict(use_imp_forward=False, use_imp_backward=False, use_tla=False),
    "c:dwfuse+tla": dict(use_imp_forward=False, use_imp_backward=False),
    "d:+imp_fwd": dict(use_imp_backward=False),
    "e:+imp_bwd(full)": dict(),
}


def run_one(name, omni, x, y, mask, train_idx, test_idx, args, seed):
    specs = [ModalitySpec(m, (x[m].shape[1],)) for m in MODALITIES]
    cfg = TrainConfig(hidden_dim=args.hidden, omnifuse={"depth": args.depth, **omni})
    torch.manual_seed(seed)
    method = build_method(name, specs, "binary", 2, cfg)
    val = holdout_mask(train_idx.astype(str), y[train_idx], fraction=0.2, seed=seed)
    tr, va = train_idx[~val], train_idx[val]
    part = lambda idx: ({m: x[m][idx] for m in MODALITIES}, mask[idx], y[idx])  # noqa: E731
    loop.fit(method, part(tr), part(va), "binary", epochs=args.epochs, batch_size=64, lr=args.lr,
             p_drop=0.5, patience=args.patience, seed=seed)
    predict = loop.make_predict_fn(method, "binary")
    xt, mt, yt = part(test_idx)
    return compute_metrics("binary", yt, predict(xt, mt)["probabilities"])["auroc"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(REGISTRY))
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--json", help="write the raw per-fold numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))

    truth = generate_truth(n=args.n, seed=args.seed)
    x = render_embeddings(truth, dim=64)
    y = truth["label"].to_numpy().astype(float)
    ids = truth["sample_id"].to_numpy()
    folds = kfold_assignments(ids, y, k=args.folds, seed=args.seed)
    full = np.ones((len(y), len(MODALITIES)), bool)
    missing = simulate_missing(full, 0.5, args.seed + 99)
    conditions = {"complete": full, "missing50": missing}
    runs = [(m, m, {}) for m in args.methods.split(",")]
    if not args.no_ablation:
        runs += [(f"omnifuse[{k}]", "omnifuse", v) for k, v in ABLATIONS.items() if k != "e:+imp_bwd(full)"]
    scores: dict[str, dict[str, list[float]]] = {c: {} for c in conditions}
    t0 = time.perf_counter()
    for cond, mask in conditions.items():
        # unimodal references: concat given a single modality, on the samples that have it
        for j, m in enumerate(MODALITIES):
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
            print(f"[{time.perf_counter() - t0:6.0f}s] {cond:9s} {label:24s} "
                  f"{np.mean(scores[cond][label]):.3f} ± {np.std(scores[cond][label]):.3f}", file=sys.stderr)
    print_table(scores, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "scores": scores}, fh, indent=2)


def print_table(scores, args):
    from scipy.stats import ttest_rel

    print(f"\nFusion quality: synthetic clinical cohort, n={args.n}, {args.folds}-fold CV, AUROC mean ± std "
          f"(epochs {args.epochs}, width {args.hidden}, R={args.depth})")
    conds = list(scores)
    labels = list(scores[conds[0]])
    print(f"{'method':26s}" + "".join(f"{c:>22s}" for c in conds) + "".join(f"{'p vs omnifuse (' + c + ')':>28s}"
                                                                            for c in conds))
    for label in labels:
        row = f"{label:26s}"
        for c in conds:
            v = scores[c][label]
            row += f"{np.mean(v):>15.3f} ± {np.std(v):.3f}"
        for c in conds:
            if label == "omnifuse" or "omnifuse" not in scores[c]:
                row += f"{'-':>28s}"
            else:
                row += f"{ttest_rel(scores[c]['omnifuse'], scores[c][label]).pvalue:>28.3g}"
        print(row)
    for c in conds:
        ranked = sorted((k for k in scores[c] if not k.startswith(("only:", "omnifuse["))),
                        key=lambda k: -np.mean(scores[c][k]))
        print(f"rank of omnifuse ({c}): {ranked.index('omnifuse') + 1} of {len(ranked)}" if "omnifuse" in ranked
              else "")


if __name__ == "__main__":
    main()
