"""Issue 18's quality criterion on the data sets of ``benchmarks/fusion_quality.py``: rows ``auto`` and
``auto ensemble``, nested cross-validation on the same outer folds and view-dropout masks.

For each outer fold f of fusion_quality.py (same folds, masks, seeds and training settings):

1. inner cross-validation on the outer training part only (``--inner-folds``, default 3; stratified,
   grouped like the outer folds, seeded): every candidate is fitted on the other inner folds and predicts
   the held-out inner fold (out-of-fold probabilities), with fusion_quality.py's own ``run_one``;
2. the choice, as ``train.method=auto`` makes it (``raypipe.tune.auto.choose_model``, rule ``--select``,
   default auto's own): from the candidates' inner-fold scores and the greedy weighted ensemble's
   (``raypipe.fusion.ensemble.greedy_ensemble``, Caruana et al., size 25), scored on each inner fold with
   weights chosen on the other inner folds' predictions; ``best``: the best mean (a tie goes to the single
   method), ``ensemble_1se``: the ensemble unless the best single candidate beats it by more than one
   standard error;
3. every candidate is fitted on the whole outer training part (the very fit fusion_quality.py makes for
   its table row: same call, same seed) and predicts the outer test fold; ``auto``'s score on fold f is
   the chosen candidate's (or the ensemble's), ``auto ensemble``'s is the ensemble's with weights fitted
   on all the inner out-of-fold predictions, whichever auto chose.
   With ``--refit bag`` (``train.auto.refit: bag``) nothing is refitted: a candidate's outer test
   prediction is the mean of its inner fold models' (the inner fits of step 1, made again with the same
   seeds so that they also predict the outer test fold; cached as ``*_bag.npz``), and the ensemble's is
   the weighted average of those bags.

Nothing of the outer test fold is used for a choice. The candidate list is small on purpose (each
candidate costs inner-folds + 1 fits per outer fold); the default is the four methods issue 18 names as
winners somewhere: concat, se_gate, late and OmniFuse's DWFuse-only row b. ``raypipe train
--set train.method=auto`` itself defaults to every registered method and 5 inner folds;
``--candidates all`` uses that list (17 methods for a binary task: about 4x the cost of the default).

Each candidate's fits are cached per outer fold under ``--cache`` (npz of probabilities), so candidates
can be computed by separate processes (``--fit-only``) and combined by a last call; the output is a
``--json`` file in fusion_quality.py's format, merged into its tables with ``--from-json``:

    python benchmarks/fusion_quality_auto.py --dataset breast_cancer --dropout 0.5 --candidates concat,late \\
        --fit-only
    python benchmarks/fusion_quality_auto.py --dataset breast_cancer --dropout 0.5 --json auto_bc_0.5.json
    python benchmarks/fusion_quality.py --from-json base_bc_0.5.json auto_bc_0.5.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch

_HERE = pathlib.Path(__file__).resolve().parent


def _bench():
    """benchmarks/fusion_quality.py as a module (benchmarks/ is not a package)."""
    name = "fusion_quality"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "fusion_quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


DEFAULT_CANDIDATES = "concat,se_gate,late,b"


def candidate_runs(spec: str, bench, task: str | None = None) -> list[tuple[str, str, dict]]:
    """(row label, registry name, omnifuse overrides) per candidate; a letter b/c/d/f is that OmniFuse
    ablation row (labelled as in fusion_quality.py's tables), ``omnifuse`` is row e; ``all`` is every
    registered method suited to ``task`` (``train.method=auto``'s default list)."""
    out = []
    if spec.strip() == "all":
        spec = ",".join(n for n, cls in bench.REGISTRY.items() if task in cls.info.tasks)
    for c in (s.strip() for s in spec.split(",") if s.strip()):
        if c in bench.ABLATIONS:
            out.append((f"omnifuse row {c} ({bench.ABLATIONS[c][0]})", "omnifuse", bench.ABLATIONS[c][1]))
        elif c in bench.REGISTRY:
            out.append((c, c, {}))
        else:
            raise SystemExit(f"--candidates: unknown {c!r} (registered methods or ablation rows b, c, d, f)")
    return out


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def _cache_key(args, inner_k: int) -> str:
    return json.dumps({k: v for k, v in sorted(vars(args).items()) if k in (
        "dataset", "n", "folds", "epochs", "patience", "hidden", "depth", "lr", "batch_size", "p_drop", "seed")},
        sort_keys=True) + f"|inner={inner_k}"


def bag_fold(bench, data, mask, folds, f, label, name, omni, args, inner_k: int, cache: str | None,
             got: dict) -> dict:
    """``train.auto.refit: bag`` for one candidate on outer fold f: the inner fold models' probabilities on the
    outer test fold, ``bag_test`` (inner_k, n_test, K); their mean is the bagged prediction (no refit).

    The inner fits are fusion_quality.py's ``run_one`` with the very arguments and seeds of
    :func:`candidate_fold`'s inner fits, predicting the held-out inner fold and the outer test fold in one
    call (eval mode, row by row independent), so they are the same models: ``oof_max_diff`` is the largest
    difference of their inner out-of-fold probabilities from ``got["oof"]`` (the cached ones; 0 on the same
    machine and torch build). Cached as ``<...>_f<f>_bag.npz``."""
    tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
    key = _cache_key(args, inner_k)
    path = None
    if cache:
        path = os.path.join(cache, f"{data.name}_{args.dropout}_{_slug(label)}_f{f}_bag.npz")
        if os.path.exists(path):
            z = np.load(path, allow_pickle=False)
            if str(z["key"]) == key:
                return {"bag_test": z["bag_test"], "oof_max_diff": float(z["oof_max_diff"]),
                        "seconds": float(z["seconds"])}
    t0 = time.perf_counter()
    inner = got["inner"]
    bag, diff = [], 0.0
    for g in range(inner_k):
        itr, ite = tr[inner != g], tr[inner == g]
        r = bench.run_one(name, omni, data, mask, itr, np.concatenate([ite, te]), args,
                          args.seed + 1000 + 10 * f + g, return_probabilities=True)
        prob = np.asarray(r["probabilities"], float)
        diff = max(diff, float(np.abs(prob[:len(ite)] - got["oof"][inner == g]).max()))
        bag.append(prob[len(ite):])
    out = {"bag_test": np.stack(bag), "oof_max_diff": diff, "seconds": time.perf_counter() - t0}
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", key=key, **out)
        os.replace(path + ".tmp.npz", path)
    return out


def candidate_fold(bench, data, mask, folds, f, label, name, omni, args, inner_k: int, cache: str | None) -> dict:
    """Inner out-of-fold probabilities on outer fold f's training part and the outer test probabilities of one
    candidate (from the cache when present)."""
    tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
    path = None
    key = _cache_key(args, inner_k)
    if cache:
        rate = args.dropout
        path = os.path.join(cache, f"{data.name}_{rate}_{_slug(label)}_f{f}.npz")
        if os.path.exists(path):
            z = np.load(path, allow_pickle=False)
            if str(z["key"]) == key:
                return {"inner": z["inner"], "oof": z["oof"], "test": z["test"], "seconds": float(z["seconds"])}
    t0 = time.perf_counter()
    inner = bench.kfold_assignments(data.ids[tr], data.y[tr], groups=None if data.groups is None else data.groups[tr],
                                    k=inner_k, seed=args.seed + 1000 + f)
    oof = None
    for g in range(inner_k):
        itr, ite = tr[inner != g], tr[inner == g]
        r = bench.run_one(name, omni, data, mask, itr, ite, args, args.seed + 1000 + 10 * f + g,
                          return_probabilities=True)
        if oof is None:
            oof = np.zeros((len(tr), r["probabilities"].shape[1]))
        oof[inner == g] = r["probabilities"]
    # the outer fit: the same call as fusion_quality.py's table row for this fold
    test = bench.run_one(name, omni, data, mask, tr, te, args, args.seed + f, return_probabilities=True)["probabilities"]
    out = {"inner": inner, "oof": oof, "test": np.asarray(test, float), "seconds": time.perf_counter() - t0}
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".tmp.npz", key=key, **out)
        os.replace(path + ".tmp.npz", path)
    return out


def choose(task: str, y_inner_rows: np.ndarray, inner: np.ndarray, oofs: dict[str, np.ndarray], size: int = 25,
           select: str = "best", complexity: dict[str, float] | None = None):
    """auto's choice on one outer training part: inner-fold scores per candidate and for the ensemble
    (weights chosen on the other inner folds), the choice by auto's own rule (``raypipe.tune.auto.choose_model``,
    ``select``; ``best``: the highest mean, a tie to the single method, then to the earlier candidate), and the
    ensemble weights fitted on all inner out-of-fold predictions. Returns (choice, means, weights, per-fold)."""
    from raypipe.fusion.ensemble import combine, greedy_ensemble
    from raypipe.tune.auto import _metric_fn, choose_model

    metric = "auroc"
    score = _metric_fn(task, metric)  # auto's own selection score (= compute_metrics' value, computed faster)
    labels = list(oofs)
    k = int(inner.max()) + 1
    per_fold = {l: np.array([score(y_inner_rows[inner == g], oofs[l][inner == g]) for g in range(k)])
                for l in labels}
    preds = [oofs[l] for l in labels]
    ens = []
    for g in range(k):
        w_g, _ = greedy_ensemble([p[inner != g] for p in preds], y_inner_rows[inner != g], score, size)
        ens.append(score(y_inner_rows[inner == g], combine([p[inner == g] for p in preds], w_g)))
    per_fold["ensemble"] = np.array(ens)
    means = {l: float(np.mean(v)) for l, v in per_fold.items()}
    w, _ = greedy_ensemble(preds, y_inner_rows, score, size)
    chosen = choose_model(per_fold, True, select, complexity)
    return chosen, means, {l: float(v) for l, v in zip(labels, w)}, {l: v.tolist() for l, v in per_fold.items()}


def parameter_counts(bench, data, runs, args) -> dict[str, int]:
    """Trainable parameters of each candidate as fusion_quality.py builds it (``simplest_1se``'s complexity)."""
    from raypipe.config import TrainConfig
    from raypipe.fusion.base import ModalitySpec
    from raypipe.fusion.registry import build_method

    specs = [ModalitySpec(m, (data.views[m].shape[1],)) for m in data.modalities]
    out = {}
    for label, name, omni in runs:
        cfg = TrainConfig(hidden_dim=args.hidden, omnifuse={**bench.omnifuse_overrides(args), **omni})
        m = build_method(name, specs, data.task, data.n_classes, cfg)
        out[label] = int(sum(p.numel() for p in m.parameters() if p.requires_grad))
    return out


def main(argv=None) -> dict:
    bench = _bench()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help="comma list: registered methods, OmniFuse ablation letters (b, c, d, f), omnifuse (row e); "
                        "'all': every registered method suited to the task, as train.method=auto's default")
    p.add_argument("--inner-folds", type=int, default=3)
    p.add_argument("--cache", default=str(_HERE / "quality_runs" / "auto_cache"),
                   help="npz per candidate and outer fold ('' for none)")
    p.add_argument("--fit-only", action="store_true", help="compute the candidates' fits into the cache, no rows")
    p.add_argument("--select", default=None, help="auto's rule for the choice (raypipe.tune.auto.SELECT_RULES): "
                                                  "best, ensemble_1se or simplest_1se; default auto's own")
    p.add_argument("--refit", default="full", choices=("full", "bag"),
                   help="train.auto.refit: full = the chosen model fitted on the whole outer training part (the "
                        "cached outer fits); bag = no refit, the mean of the inner fold models' predictions "
                        "(new inner fits that also predict the outer test fold, cached as *_bag.npz). Default "
                        "full (the cached rows' mode), although train.auto.refit defaults to bag")
    own, rest = p.parse_known_args(argv)
    if own.select is None:
        from raypipe.tune.auto import DEFAULT_SELECT

        own.select = DEFAULT_SELECT
    args = bench.build_parser().parse_args(rest)  # fusion_quality.py's settings (--dataset, --dropout, --epochs ...)
    rates = [float(r) for r in args.dropout.split(",") if r.strip()]
    if len(rates) != 1:
        raise SystemExit("--dropout: one rate per call (the cache is per rate)")
    torch.set_num_threads(args.threads)
    data = bench.load_dataset(args.dataset, args.n, args.seed)
    folds = bench.make_folds(data, args.folds, args.seed)
    (cond, mask), = bench.make_conditions(data, rates, args.seed).items()
    runs = candidate_runs(own.candidates, bench, data.task)
    started = bench.run_context()
    t0 = time.perf_counter()
    k = int(folds.max()) + 1
    from raypipe.fusion.ensemble import combine
    from raypipe.train.metrics import compute_metrics

    auto_rows, ens_rows, detail = [], [], []
    complexity = None
    for f in range(k):
        got = {}
        for label, name, omni in runs:
            got[label] = candidate_fold(bench, data, mask, folds, f, label, name, omni, args, own.inner_folds,
                                        own.cache or None)
            print(f"[{time.perf_counter() - t0:6.0f}s] {data.name} {cond} fold {f} {label}: "
                  f"{got[label]['seconds']:.0f} s", file=sys.stderr, flush=True)
            if own.refit == "bag":
                b = bag_fold(bench, data, mask, folds, f, label, name, omni, args, own.inner_folds, own.cache or None,
                             got[label])
                got[label]["full_test"], got[label]["test"] = got[label]["test"], b["bag_test"].mean(axis=0)
                got[label]["oof_max_diff"] = b["oof_max_diff"]
                print(f"[{time.perf_counter() - t0:6.0f}s] {data.name} {cond} fold {f} {label} bag: "
                      f"{b['seconds']:.0f} s (inner oof vs cache: max diff {b['oof_max_diff']:.2g})",
                      file=sys.stderr, flush=True)
        if own.fit_only:
            continue
        tr, te = folds != f, folds == f
        inner = next(iter(got.values()))["inner"]
        if own.select == "simplest_1se" and complexity is None:
            complexity = parameter_counts(bench, data, runs, args)
        chosen, means, weights, inner_scores = choose(data.task, data.y[tr].astype(float), inner,
                                                      {l: g["oof"] for l, g in got.items()}, select=own.select,
                                                      complexity=complexity)
        yt = data.y[te].astype(float)
        test = {l: compute_metrics(data.task, yt, g["test"]) for l, g in got.items()}
        ens_prob = combine([got[l]["test"] for l in got], [weights[l] for l in got])
        ens = compute_metrics(data.task, yt, ens_prob)
        labels = list(got)
        a = dict(ens if chosen == "ensemble" else test[chosen])
        a.update(chosen=chosen, candidates=labels)
        e = dict(ens)
        e.update(weights=weights, candidates=labels)
        auto_rows.append(a)
        ens_rows.append(e)
        detail.append({"fold": f, "chosen": chosen, "inner_means": means, "inner_folds": inner_scores,
                       "weights": weights,
                       "outer": {l: test[l]["auroc"] for l in labels}})
        if own.refit == "bag":  # the refitted (full) models' outer scores beside the bags' ones
            detail[-1]["outer_full"] = {l: compute_metrics(data.task, yt, g["full_test"])["auroc"]
                                        for l, g in got.items()}
            detail[-1]["oof_max_diff"] = {l: g["oof_max_diff"] for l, g in got.items()}
    if own.fit_only:
        return {}
    elapsed = time.perf_counter() - t0
    scores = {cond: {bench.AUTO_ROW: auto_rows, bench.ENSEMBLE_ROW: ens_rows}}
    for d in detail:
        print(f"{cond} fold {d['fold']}: chose {d['chosen']} (inner " + ", ".join(
            f"{l} {v:.3f}" for l, v in d["inner_means"].items()) + "); outer " + ", ".join(
            f"{l} {v:.3f}" for l, v in d["outer"].items()) + f"; auto {auto_rows[d['fold']]['auroc']:.3f}, "
            f"ensemble {ens_rows[d['fold']]['auroc']:.3f}")
    command = "python benchmarks/fusion_quality_auto.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:  # written whole to a temporary name, then renamed: a crash leaves no half-written file
        tmp = f"{args.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump({"args": vars(args), "dataset": data.name, "scores": scores, "seconds": elapsed,
                       "command": command, "context": started,
                       "auto": {"candidates": [r[0] for r in runs], "inner_folds": own.inner_folds,
                                "select": own.select, "refit": own.refit, "complexity": complexity,
                                "folds": detail}}, fh, indent=2)
        os.replace(tmp, args.json)
    return scores


if __name__ == "__main__":
    main()
