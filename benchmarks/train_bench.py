"""Training speed: one Ray Train worker vs the framework-free loop on the same data; 2 workers vs 1.

Same method (OmniFuse), same embeddings (rendered from the synthetic truth), same epochs and
batch size. Samples/s = training samples x epochs / wall time of the fit (Ray: TorchTrainer.fit,
including worker start-up and per-epoch validation and checkpoints).

    python benchmarks/train_bench.py --n 4000 --epochs 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--method", default="omnifuse")
    args = p.parse_args(argv)

    import torch

    from raypipe.config import load_config
    from raypipe.runtime import init_ray
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth
    from raypipe.train import loop
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits, build_from_meta, fit_torch_trainer, model_meta

    work = tempfile.mkdtemp(prefix="rp-train-bench-")
    emb = write_truth_embeddings(generate_truth(n=args.n, seed=0), os.path.join(work, "emb"), dim=64)
    base = [f"run.out_dir={work}", f"train.input={emb}", f"train.epochs={args.epochs}", "train.patience=1000",
            f"train.batch_size={args.batch_size}", "train.hidden_dim=32", "train.omnifuse.depth=3",
            f"train.method={args.method}", "ray.progress_bars=false"]
    cfg = load_config(None, base)
    table = read_embeddings(emb)
    task, k = infer_task(table.y)
    split = assign_splits(table, cfg)
    meta = model_meta(cfg, table, task, k)
    tr, va = split == "train", split == "val"
    n_train = int(tr.sum())

    torch.set_num_threads(1)  # a Ray Train worker gets one CPU
    method = build_from_meta(meta)
    part = lambda m: ({x: v[m] for x, v in table.x.items()}, table.mask[m], table.y[m])  # noqa: E731
    t0 = time.perf_counter()
    loop.fit(method, part(tr), part(va), task, epochs=args.epochs, batch_size=args.batch_size, patience=1000)
    t_plain = time.perf_counter() - t0

    rctx = init_ray(cfg)
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val")}
    times = {}
    for workers in (1, 2):
        c = load_config(None, base + [f"train.num_workers={workers}"])
        t0 = time.perf_counter()
        fit_torch_trainer(c, meta, ids["train"], ids["val"], f"bench-{workers}w-{time.time_ns()}", rctx.results_dir)
        times[workers] = time.perf_counter() - t0
    sps = lambda t: n_train * args.epochs / t  # noqa: E731
    print(f"\ntrain benchmark: {args.method}, {n_train} training samples x {args.epochs} epochs, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs")
    print(f"framework-free loop (1 thread): {sps(t_plain):8.0f} samples/s ({t_plain:.1f}s)")
    print(f"Ray Train, 1 worker           : {sps(times[1]):8.0f} samples/s ({times[1]:.1f}s incl. start-up)")
    print(f"Ray Train, 2 workers (DDP)    : {sps(times[2]):8.0f} samples/s ({times[2]:.1f}s)")
    print(f"ratio 1 worker / loop: {t_plain / times[1]:.2f}; 2 workers / 1 worker: {times[1] / times[2]:.2f}")


if __name__ == "__main__":
    main()
