"""Speed of ``train.method=auto``: N candidates x k folds on Ray vs the same fits one after another.

One run, two paths, the same work on the same folds:

(a) ``raypipe.tune.auto.cross_validate``: one 1-CPU Ray task per (candidate, fold), as many at
    once as the local Ray has CPUs (``slots``), the data put in the object store once; plus the
    greedy ensemble over the out-of-fold predictions and the leaderboard. Timed: the whole call (Ray already started, as
    in a run after ingest/embed; the refit of the winner is not included), and its parts
    (preparation, fits, ensemble) as ``cross_validate`` reports them.
(b) the same (candidate, fold) fits with the same fold function (``raypipe.tune.folds.fold_task``),
    one after another in this process, 1 torch thread (what a 1-CPU task gets). Timed: every fit.

Embeddings: the synthetic cohort's latent observations rendered as embeddings
(``raypipe.synth.embeddings``; the demo's generator), or ``--input`` an embeddings table such
as the demo's. Every fit runs all its epochs (patience = epochs). Prints both wall
times, the speed-up (b)/(a), the slots and the goal 0.8 x min(slots, N x k), the CPU seconds
of both paths (the Ray path's over this process, Ray's daemons and its workers), and the
per-candidate CV means of both paths (equal: same fits). Run timing runs alone on the
machine (``flock /tmp/raypipe_bench.lock python benchmarks/auto_bench.py``): on a loaded
machine the ratio measures the load.

    python benchmarks/auto_bench.py                                  # 4 candidates x 5 folds
    python benchmarks/auto_bench.py --candidates concat,late,sum,se_gate,omnifuse --folds 5 --n 1000
    python benchmarks/auto_bench.py --input runs/demo/embeddings --epochs 4

``--refit MEMBERS`` times the refit of a chosen model instead (no CV): ``MEMBERS`` is one candidate
(a single-method refit) or ``name:weight,...`` (an ensemble), refitted on the training split with
``--config``'s train settings (default configs/demo.yaml) both ways auto can do it
(``raypipe.tune.auto.refit_runner``): ``ray_train`` (each member through `raypipe train`'s Ray Train V2
path, one after another: the code before 2026-12-02's second session) and ``tasks`` (every member at once
as a 1-CPU Ray task running the CV fits' loop). Prints per runner the wall, the CPU seconds of this
process and the local Ray (sampled every 0.2 s, so exiting Train workers count) and the test score:

    python benchmarks/auto_bench.py --refit concat:0.292,late:0.458,se_gate:0.167,attention:0.083 \
        --input runs/demo/embeddings
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def tree_cpu_meter():
    """A context manager measuring the CPU seconds (user + system) this process and its descendants (a local
    ``ray.init``'s daemons and workers) spend inside it, per pid, sampled every 0.25 s, so Ray workers that
    exit inside the interval count (``benchmarks/ingest_bench.py``'s :class:`TreeCPU`; a difference of two
    live-tree sums lost them)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ingest_bench import TreeCPU

    return TreeCPU()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", default="concat,late,sum,se_gate", help="comma-separated methods (N)")
    p.add_argument("--folds", type=int, default=5, help="k")
    p.add_argument("--n", type=int, default=600, help="samples (80%% cross-validated)")
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--hidden-dim", type=int, default=32)
    p.add_argument("--cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    p.add_argument("--input", default=None, help="an embeddings table (e.g. the demo's runs/demo/embeddings) "
                                                 "instead of the synthetic-truth one; --n/--dim then unused")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--refit", default=None, help="time the refit of this model instead: a candidate, or "
                                                  "name:weight,... for an ensemble")
    p.add_argument("--config", default="configs/demo.yaml", help="--refit: the train settings")
    p.add_argument("--runners", default="ray_train,tasks", help="--refit: the ways to time, in this order")
    args = p.parse_args(argv)
    if args.refit:
        return refit_bench(args)

    import numpy as np
    import ray
    import torch

    from raypipe.config import load_config
    from raypipe.runtime import init_ray
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth
    from raypipe.train.splits import kfold_assignments
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits
    from raypipe.tune.auto import candidates, cross_validate
    from raypipe.tune.folds import fold_task, n_outputs_for

    work = tempfile.mkdtemp(prefix="auto-bench-")
    emb = args.input or write_truth_embeddings(generate_truth(n=args.n, seed=0), os.path.join(work, "emb"),
                                               dim=args.dim)
    cands = args.candidates.split(",")
    cfg = load_config(None, [f"run.out_dir={work}", f"train.input={emb}", "train.method=auto",
                             f"train.epochs={args.epochs}", f"train.patience={args.epochs}",
                             f"train.hidden_dim={args.hidden_dim}", f"train.auto.folds={args.folds}",
                             f"train.auto.candidates=[{','.join(cands)}]", "ray.progress_bars=false",
                             *([f"ray.num_cpus={args.cpus}"] if args.cpus else [])])
    table = read_embeddings(emb)
    task, _ = infer_task(table.y)
    init_ray(cfg)
    slots = int(ray.cluster_resources().get("CPU", 1))

    metric = "auroc"
    with tree_cpu_meter() as meter:
        t0 = time.perf_counter()
        summary = cross_validate(cfg, table, task, metric, True, os.path.join(work, "auto"))
        t_ray = time.perf_counter() - t0
    cpu_ray = meter.seconds

    sub = table.take(assign_splits(table, cfg) != "test")
    folds = kfold_assignments(sub.sample_id, sub.y, k=args.folds, seed=cfg.run.seed)
    data = (sub.x, sub.mask, sub.y, sub.sample_id, {m: list(s) for m, s in sub.shapes.items()})
    threads = torch.get_num_threads()
    seq_means = {}
    c0, t0 = time.process_time(), time.perf_counter()
    seq_train = 0.0
    for c in candidates(cfg, task):
        rows = [fold_task(c.method, {}, c.train_cfg, data, f, folds, task, sub.modalities, cfg.run.seed,
                          patterns=False, n_outputs=n_outputs_for(task, table.y)) for f in range(args.folds)]
        seq_train += sum(r["seconds"] for r in rows)
        seq_means[c.label] = float(np.mean([r[metric] for r in rows]))
    t_seq, cpu_seq = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(threads)
    fits = len(cands) * args.folds
    out = {"candidates": cands, "folds": args.folds, "fits": fits, "samples_cv": int(len(sub)),
           "epochs": args.epochs, "slots": slots, "ray_seconds": round(t_ray, 2), "sequential_seconds": round(t_seq, 2),
           "speedup": round(t_seq / t_ray, 3), "ray_fits_seconds": summary["cv_seconds"],
           "ray_parts_seconds": summary["seconds"], "ray_cpu_seconds": round(cpu_ray, 1), "sequential_cpu_seconds": round(cpu_seq, 1),
           "sequential_training_seconds": round(seq_train, 2),
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
           "goal": round(0.8 * min(slots, fits), 2),
           "chosen": summary["chosen"], "cv_mean_ray": {k: round(v, 4) for k, v in summary["mean"].items()},
           "cv_mean_sequential": {k: round(v, 4) for k, v in seq_means.items()}}
    print(f"auto CV, {len(cands)} candidates x {args.folds} folds = {fits} fits, {len(sub)} rows, "
          f"{args.epochs} epochs, {slots} slots")
    print(f"  Ray (raypipe auto):   {t_ray:7.1f} s (incl. ensemble + leaderboard); the fits alone "
          f"{summary['cv_seconds']:.1f} s (speed-up {t_seq / summary['cv_seconds']:.2f})")
    parts = summary["seconds"]
    print(f"    of it: preparation {parts['prepare']:.1f} s, fits {parts['fits']:.1f} s (the fits' own training "
          f"{parts['fits_summed']:.1f} s summed over slots, {parts['fits_cpu_summed']:.1f} CPU s in the tasks), "
          f"ensemble {parts['ensemble']:.1f} s, rest "
          f"{t_ray - parts['total']:.1f} s")
    print(f"  sequential, 1 proc:   {t_seq:7.1f} s (the fits' own training {seq_train:.1f} s)")
    print(f"  CPU seconds: Ray path {cpu_ray:.1f} (this process, Ray's daemons and workers), sequential "
          f"{cpu_seq:.1f} (this process)")
    print(f"  speed-up {t_seq / t_ray:.2f} (goal >= 0.8 x min(slots, N x k) = {0.8 * min(slots, fits):.2f})")
    print("  CV means, Ray vs sequential: " + ", ".join(
        f"{k} {summary['mean'][k]:.4f}/{seq_means[k]:.4f}" for k in seq_means))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    ray.shutdown()
    return out


def refit_bench(args) -> dict:
    """``--refit``: the refit of one model (single or ensemble), each runner in turn, same config and data."""
    import ray

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu_meter import TreeCpu

    from raypipe.config import load_config
    from raypipe.runtime import init_ray
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import _refit_ensemble, _refit_single, candidates

    work = tempfile.mkdtemp(prefix="auto-refit-bench-")
    members = {}
    for part in args.refit.split(","):
        name, _, w = part.partition(":")
        members[name] = float(w or 1)
    cfg = load_config(args.config, [f"run.out_dir={work}", "train.method=auto", "ray.progress_bars=false",
                                    f"train.auto.candidates=[{','.join(members)}]",
                                    *([f"train.input={args.input}"] if args.input else []),
                                    *([f"ray.num_cpus={args.cpus}"] if args.cpus else [])])
    table = read_embeddings(cfg.train_input, cfg.ingest.label_columns)
    task, _ = infer_task(table.y, cfg.train.task)
    cands = {c.label: c for c in candidates(cfg, task)}
    init_ray(cfg)
    slots = int(ray.cluster_resources().get("CPU", 1))
    out = {"members": members, "config": args.config, "input": cfg.train_input, "slots": slots,
           "epochs": cfg.train.epochs, "patience": cfg.train.patience, "runs": {}}
    for runner in args.runners.split(","):
        run_dir = os.path.join(work, runner)
        load0 = os.getloadavg()
        meter, t0 = TreeCpu().start(), time.perf_counter()
        if len(members) > 1:
            res = _refit_ensemble(cfg, table, task, run_dir, members, cands, runner=runner)
        else:
            res = _refit_single(cfg, table, task, run_dir, next(iter(members)), cands, runner=runner)
        wall, cpu = time.perf_counter() - t0, meter.stop()
        with open(os.path.join(run_dir, "metrics.json")) as fh:
            doc = json.load(fh)
        main = doc["main_metric"]
        out["runs"][runner] = {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                               f"test_{main}": doc["test"]["natural"].get(main),
                               "refit": doc.get("refit"), "load_average": [load0, os.getloadavg()]}
        print(f"refit {args.refit} with {runner}: {wall:.1f} s wall, {cpu:.1f} CPU s (this process + local Ray), "
              f"test {main} {doc['test']['natural'].get(main):.4f}, load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}",
              flush=True)
    r = out["runs"]
    if "ray_train" in r and "tasks" in r:
        out["speedup"] = round(r["ray_train"]["wall_seconds"] / r["tasks"]["wall_seconds"], 2)
        print(f"  speed-up ray_train / tasks: {out['speedup']:.2f} (wall), CPU "
              f"{r['ray_train']['cpu_seconds']:.0f} -> {r['tasks']['cpu_seconds']:.0f} s; {slots} slots")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
    ray.shutdown()
    return out


if __name__ == "__main__":
    main()
