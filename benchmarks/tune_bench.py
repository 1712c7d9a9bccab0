"""Search speed: a k-fold search of N trials run by raypipe (Ray Tune) vs the same trials run one after another.

One run, two paths, the same work:

(a) ``run_tune``: a Ray Tune search (random sampler, FIFO scheduler, no early stopping), trials
    running concurrently in ``max_concurrent_trials`` slots. ``--fold-runner`` (``tune.fold_runner``):
    ``auto`` (default; "trial" for 1 train worker) fits each fold with the framework-free loop in
    the trial's process, one CPU per trial (2 slots on 2 CPUs); ``ray_train`` fits one Ray Train V2
    ``TorchTrainer`` per fold (slots: CPUs // (train workers + 1), 1 on 2 CPUs).
    Timed: ``Tuner.fit`` (the search; the final model is not trained).
(b) the same trial configurations (read back from (a)'s ``results.csv``), the same folds (its
    ``folds.parquet``), epochs, batch size and seed, fitted one after another in this process
    with the framework-free loop (``raypipe.train.loop.fit`` through the "trial" runner's own fold
    function, 1 torch thread, as a 1-CPU trial gets). Timed: every fold's build + fit; the table is
    read once, outside.

Every fold runs all its epochs (patience off) on embeddings rendered from the synthetic truth.
Prints both wall times, the speed-up (b)/(a), the number of concurrent slots and the goal
0.8 x min(slots, N), and the CV means of both paths as a sanity check: equal with the "trial"
runner (the same loop, seeds and folds), close with "ray_train" (its feed shuffles differently).

    python benchmarks/tune_bench.py                        # 8 trials x 5 folds, ~2.5 min on 2 cores
    python benchmarks/tune_bench.py --trials 4 --folds 3 --fold-runner ray_train   # a TorchTrainer per fold: ~8 min
    python benchmarks/tune_bench.py --trials 8 --folds 5 --n 4000 --epochs 10 --json /tmp/tune.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="N: number of trial configurations")
    p.add_argument("--folds", type=int, default=5, help="k: folds per trial (tune.folds default)")
    p.add_argument("--n", type=int, default=1000, help="samples in the embeddings table (80%% searched)")
    p.add_argument("--dim", type=int, default=32, help="embedding width per modality")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=32, help="width D, fixed (the rest of the space is searched)")
    p.add_argument("--max-depth", type=int, default=4, help="R is searched in 1..max-depth")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per fold")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="tune.max_concurrent_trials (default: raypipe's CPUs // (workers + 1))")
    p.add_argument("--fold-runner", choices=["auto", "trial", "ray_train"], default="auto",
                   help="tune.fold_runner: how each trial fits its folds")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import pandas as pd
    import torch

    from raypipe.config import load_config
    from raypipe.runtime import init_ray
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import model_meta
    from raypipe.tune.search import _fit_fold_in_trial, apply_params, run_tune, search_space

    work = tempfile.mkdtemp(prefix="rp-tune-bench-")
    emb = write_truth_embeddings(generate_truth(n=args.n, seed=0), os.path.join(work, "emb"), dim=args.dim)
    overrides = [f"run.out_dir={work}", "run.name=bench", f"train.input={emb}", f"train.epochs={args.epochs}",
                 "train.patience=1000", f"train.batch_size={args.batch_size}", f"train.num_workers={args.workers}",
                 f"tune.num_samples={args.trials}", f"tune.folds={args.folds}", "tune.search=random",
                 "tune.scheduler=fifo", "ray.progress_bars=false", "ray.log_to_driver=false",
                 f"tune.fold_runner={args.fold_runner}",
                 f"tune.space={{hidden_dim: {args.hidden_dim}, omnifuse.depth: [randint, 1, {args.max_depth + 1}]}}"]
    if args.max_concurrent:
        overrides.append(f"tune.max_concurrent_trials={args.max_concurrent}")
    cfg = load_config(None, overrides)
    load_before = os.getloadavg()

    # (a) raypipe: Ray Tune, trials in concurrent slots. Ray is started outside the timing.
    init_ray(cfg)
    t0 = time.perf_counter()
    summary = run_tune(cfg, train_final=False)
    t_run_tune = time.perf_counter() - t0
    t_ray = float(summary["search_seconds"])
    slots = int(summary["max_concurrent_trials"])

    # (b) the same trial configurations, folds and epochs, one after another in this process.
    results = pd.read_csv(summary["results"])
    folds = pd.read_parquet(os.path.join(work, "tune", "folds.parquet"))
    table = read_embeddings(emb)
    task, n_outputs = infer_task(table.y)
    row_of = {s: i for i, s in enumerate(table.sample_id)}
    rows = np.array([row_of[s] for s in folds.sample_id])
    # the searched rows in folds.parquet's order with their fold, as run_tune hands them to its trials
    data = ({m: v[rows] for m, v in table.x.items()}, table.mask[rows], table.y[rows], folds.fold.to_numpy())
    space_keys = list(search_space(cfg))
    torch.set_num_threads(1)  # what a 1-CPU trial (or Ray Train worker) gets
    seq_scores: list[float] = []
    t0 = time.perf_counter()
    for _, trial in results.iterrows():
        tcfg = apply_params(cfg, {k: trial[k] for k in space_keys})
        meta = model_meta(tcfg, table, task, n_outputs)
        scores = [_fit_fold_in_trial(tcfg, meta, data, f) for f in range(args.folds)]
        seq_scores.append(float(np.mean(scores)))
    t_seq = time.perf_counter() - t0
    load_after = os.getloadavg()

    n_trials = len(results)
    speedup = t_seq / t_ray
    goal = 0.8 * min(slots, n_trials)
    fold_fits = n_trials * args.folds
    print(f"\ntune benchmark: {n_trials} trials x {args.folds} folds x {args.epochs} epochs, "
          f"{len(folds)} searched samples ({args.n} in the table), OmniFuse D={args.hidden_dim}, "
          f"R in 1..{args.max_depth}, batch {args.batch_size}, {args.workers} train worker(s) per fold; "
          f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"(a) raypipe run_tune, Tuner.fit      : {t_ray:7.1f} s ({t_ray / fold_fits:.1f} s per fold fit; "
          f"run_tune incl. folds and table {t_run_tune:.1f} s; fold runner {summary['fold_runner']})")
    print(f"(b) sequential, framework-free loop  : {t_seq:7.1f} s ({t_seq / fold_fits:.1f} s per fold fit)")
    print(f"concurrent slots: {slots}; speed-up (b)/(a): {speedup:.2f}; goal 0.8 x min(slots, N) = {goal:.2f}: "
          f"{'met' if speedup >= goal else 'NOT met'}")
    ray_means = results.sort_values("trial_id").cv_mean.to_numpy()
    seq_means = np.array(seq_scores)[np.argsort(results.trial_id.to_numpy())]
    print(f"CV means, Ray / sequential: " + ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(ray_means, seq_means)))
    if summary["fold_runner"] == "trial":  # the same arithmetic in another process: the same numbers
        print(f"same CV means as the sequential loop (the same work): {bool(np.allclose(ray_means, seq_means))}")
    res = {"fold_runner": summary["fold_runner"], "trials": n_trials, "folds": args.folds, "epochs": args.epochs, "n": args.n,
           "searched_samples": int(len(folds)), "cpus": os.cpu_count(), "slots": slots, "ray_s": t_ray,
           "run_tune_s": t_run_tune, "sequential_s": t_seq, "speedup": speedup, "goal": goal,
           "load_before": load_before[0], "load_after": load_after[0],
           "cv_mean_ray": ray_means.tolist(), "cv_mean_sequential": seq_means.tolist()}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
