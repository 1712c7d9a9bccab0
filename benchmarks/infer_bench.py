"""Inference speed: `run_infer` (Ray Data actor pool) vs a plain loop over the same embeddings.

Trains a small OmniFuse once (framework-free loop) on embeddings rendered from the synthetic
truth, writes it as a run directory, then predicts N samples (a) in one process with the
same prediction function and batch size, (b) with `run_infer` (read, actor pool, write). Prints
predictions/s and CPU seconds per row (the Ray path: every process of the local Ray, start-up included).

    python benchmarks/infer_bench.py --n 1000000            # the issue-17 acceptance size
    python benchmarks/infer_bench.py --device cuda --n 2000000 --batch-size 16384   # one GPU actor
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


# the shared CPU meter (benchmarks/cpu_meter.py); this script's folder is on sys.path when run as a script
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_meter import TreeCpu  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the plain loop and one predictor actor (infer.num_gpus_per_actor=1) on the GPU")
    p.add_argument("--actor-batch", type=int, default=16384,
                   help="rows per Ray Data batch (infer.rows_per_actor_batch); the model predicts --batch-size at a time")
    p.add_argument("--pool", type=int, default=0, help="predictor actors (infer.pool_size); 0: one per CPU")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--cache", default=None,
                   help="keep the generated embeddings table and trained run here and reuse them on the next run "
                        "with the same --n (generating 1,000,000 rows takes ~5 minutes; a table cached before "
                        "16f4660 is one Parquet row group, which infer reads with one task: delete it to rebuild)")
    args = p.parse_args(argv)

    import pyarrow as pa
    import torch

    import raypipe
    from raypipe.config import TrainConfig, load_config
    from raypipe.runtime import init_ray
    from raypipe.synth.embeddings import write_truth_embeddings
    from raypipe.synth.latent import generate_truth
    from raypipe.train import loop
    from raypipe.train.tables import read_embeddings
    from raypipe.train.trainer import META_FILE, MODEL_FILE, build_from_meta

    work = tempfile.mkdtemp(prefix="rp-infer-bench-")
    cache = os.path.join(args.cache, f"n{args.n}") if args.cache else None
    cached = bool(cache) and os.path.isfile(os.path.join(cache, "run", META_FILE))
    emb_dir = os.path.join(cache or work, "emb")
    if not cached:
        write_truth_embeddings(generate_truth(n=args.n, seed=0), emb_dir, dim=64)
    table = read_embeddings(emb_dir)
    import pyarrow.parquet as pq

    # read parallelism of raypipe's infer is one task per row group: say how the table is grouped
    row_groups = sum(pq.ParquetFile(os.path.join(emb_dir, f)).metadata.num_row_groups
                     for f in sorted(os.listdir(emb_dir)) if f.endswith(".parquet") and not f.startswith(("_", ".")))
    tc = TrainConfig(hidden_dim=32, omnifuse={"depth": 3})
    meta = {"method": "omnifuse", "modalities": table.modalities, "shapes": {m: list(s) for m, s in table.shapes.items()},
            "task": "binary", "n_outputs": 2, "label_columns": ["label"], "embedding_spec": table.spec,
            "train_config": tc.model_dump(mode="json"), "seed": 0}
    method = build_from_meta(meta)
    run = os.path.join(cache or work, "run")
    if cached:
        method.load_state_dict(torch.load(os.path.join(run, MODEL_FILE)))
    else:
        k = min(2000, args.n)
        part = ({m: v[:k] for m, v in table.x.items()}, table.mask[:k], table.y[:k])
        loop.fit(method, part, part, "binary", epochs=2, batch_size=64)
        os.makedirs(run, exist_ok=True)
        torch.save(method.state_dict(), os.path.join(run, MODEL_FILE))
        json.dump(meta, open(os.path.join(run, META_FILE), "w"))  # last: marks the cache complete

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    torch.set_num_threads(1)  # one predictor actor uses one CPU as well
    method.to(args.device)
    predict = loop.make_predict_fn(method, "binary", device=args.device)
    predict({m: v[:args.batch_size] for m, v in table.x.items()}, table.mask[:args.batch_size])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, args.n, args.batch_size):
        predict({m: v[i:i + args.batch_size] for m, v in table.x.items()}, table.mask[i:i + args.batch_size])
    t_plain, cpu_plain = time.perf_counter() - t0, time.process_time() - c0

    # (a2) the same job in one process end to end: read the Parquet table, predict, write the predictions
    # table (the Ray path's Predictor code for the Arrow <-> numpy parts)
    from raypipe.infer.pipeline import Predictor

    t0, c0 = time.perf_counter(), time.process_time()
    pred = Predictor(run, device=args.device, batch_size=args.batch_size)
    os.makedirs(os.path.join(work, "pred_plain"))
    with pq.ParquetFile(os.path.join(emb_dir, "part-00000.parquet")) as pf:
        writer = None
        for i, b in enumerate(pf.iter_batches(batch_size=max(args.batch_size, args.actor_batch))):
            out_t = pred(pa.Table.from_batches([b]))
            if writer is None:
                writer = pq.ParquetWriter(os.path.join(work, "pred_plain", "part-0.parquet"), out_t.schema)
            writer.write_table(out_t)
        writer.close()
    t_plain_io, cpu_plain_io = time.perf_counter() - t0, time.process_time() - c0

    cfg = load_config(None, [f"run.out_dir={work}", f"infer.checkpoint={run}", f"infer.input={emb_dir}",
                             f"infer.out={work}/pred", f"infer.batch_size={args.batch_size}", "ray.progress_bars=false",
                             f"infer.rows_per_actor_batch={args.actor_batch}",
                             *([f"infer.pool_size={args.pool}"] if args.pool else []),
                             f"infer.num_gpus_per_actor={1 if args.device == 'cuda' else 0}"])
    init_ray(cfg)
    from raypipe.infer.pipeline import run_infer

    from raypipe.runtime import cluster_resources

    cpus = cluster_resources().get("CPU", 0)
    pool = args.pool or (1 if args.device == "cuda" else max(1, int(cpus)))
    t0, meter = time.perf_counter(), TreeCpu().start()
    res = run_infer(cfg)
    t_ray, cpu_ray = time.perf_counter() - t0, meter.stop()
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    print(f"\ninfer benchmark: OmniFuse (4 modalities, 64-d), {args.n} samples, model batch {args.batch_size}, "
          f"{args.actor_batch} rows per actor batch, {pool} predictor actor(s), {os.cpu_count()} CPUs{gpu}, "
          f"device {args.device}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}; "
          f"raypipe from {os.path.dirname(os.path.dirname(raypipe.__file__))}; table of {row_groups} Parquet "
          f"row group(s){' (cached)' if cached else ''}")
    print(f"plain loop ({args.device}, 1 thread): {args.n / t_plain:10.0f} predictions/s (in-memory arrays, no I/O)")
    print(f"plain end to end        : {args.n / t_plain_io:10.0f} predictions/s (one process: read Parquet, "
          "predict, write Parquet)")
    print(f"ray data                : {args.n / t_ray:10.0f} predictions/s (incl. start-up, read, write; "
          f"{res['rows']} rows written)")
    print(f"ratio (ray/plain): {t_plain / t_ray:.2f} against the in-memory loop, {t_plain_io / t_ray:.2f} against "
          "the same job end to end in one process   (goal: >= 0.8 on CPU)")
    us = lambda c: 1e6 * c / args.n  # noqa: E731
    print(f"CPU per row: plain loop {us(cpu_plain):.1f} us, plain end to end {us(cpu_plain_io):.1f} us, ray data "
          f"{us(cpu_ray):.1f} us (every process of the local Ray, start-up included); CPU ratio ray/plain "
          f"{cpu_ray / cpu_plain:.2f} against the in-memory loop, {cpu_ray / cpu_plain_io:.2f} against end to end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "batch_size": args.batch_size, "device": args.device, "cpus": os.cpu_count(),
                       "gpu": gpu.lstrip(", ") or None, "plain_per_s": args.n / t_plain, "ray_per_s": args.n / t_ray,
                       "plain_io_per_s": args.n / t_plain_io, "ratio": t_plain / t_ray,
                       "ratio_end_to_end": t_plain_io / t_ray, "rows": res["rows"], "pool": pool,
                       "actor_batch": args.actor_batch, "row_groups": row_groups,
                       "cpu_s": {"plain": cpu_plain, "plain_io": cpu_plain_io, "ray": cpu_ray},
                       "loadavg": os.getloadavg()},
                      fh, indent=2)


if __name__ == "__main__":
    main()
