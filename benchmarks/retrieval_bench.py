"""Vector-search speed and accuracy: the HNSW index of `raypipe retrieve query` against exact search.

Builds an inner-product HNSW index (hnswlib, through ``raypipe.retrieve.pipeline.build_hnsw``)
over N synthetic unit vectors, queries it, and measures against exact numpy search
(``raypipe.retrieve.align.exact_search``, the reference):

- index build time (wall and CPU seconds) and the index's size on disk;
- queries/s of the index for each ``--ef`` (search breadth) and of exact search (wall and CPU seconds:
  on a shared machine the CPU seconds are the steadier number);
- Recall@10 of the index against exact search (share of the exact top 10 the index returns);
- peak resident memory of the process (``ru_maxrss``) after data, after build, at the end.

Data: a Gaussian mixture in ``--dim`` dimensions (``--clusters`` centres drawn N(0, 1),
points = centre + N(0, ``--spread``^2) noise, L2-normalised), i.e. embedding-like data with
cluster structure; queries are fresh draws from the same mixture (not in the index).
Threads: ``--threads`` for hnswlib and the BLAS of exact search (the issue's "2 cores").

    python benchmarks/retrieval_bench.py --n 1000000            # the issue's size (needs ~3 GiB)
    python benchmarks/retrieval_bench.py --n 200000 --queries 1000
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="indexed vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=1.0, help="within-cluster noise std (centres are N(0, 1))")
    p.add_argument("--m", type=int, default=16, help="HNSW M (links per node)")
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument("--ef", default="32,64,128,256", help="comma-separated search breadths to measure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    # BLAS threads must be fixed before numpy is imported
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import json
    import resource
    import tempfile
    import time

    import numpy as np

    from raypipe.retrieve.align import exact_search
    from raypipe.retrieve.pipeline import build_hnsw, hnsw_search

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)

    def draw(n: int, seed: int) -> np.ndarray:
        r = np.random.default_rng(seed)
        out = np.empty((n, args.dim), np.float32)
        for s in range(0, n, 100_000):  # in chunks: no float64 copy of the whole array
            m = min(100_000, n - s)
            x = centres[r.integers(0, args.clusters, m)] + args.spread * r.standard_normal(
                (m, args.dim), dtype=np.float32)
            out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    t0 = time.perf_counter()
    data = draw(args.n, args.seed + 1)
    queries = draw(args.queries, args.seed + 2)
    res = {"n": args.n, "dim": args.dim, "queries": args.queries, "k": args.k, "threads": args.threads,
           "M": args.m, "ef_construction": args.ef_construction, "clusters": args.clusters, "spread": args.spread,
           "data_seconds": round(time.perf_counter() - t0, 2), "peak_mib_after_data": round(peak_mib(), 1)}
    print(f"data: {args.n:,} x {args.dim} float32 ({data.nbytes / 2**20:.0f} MiB) in {res['data_seconds']} s",
          flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    ex_idx, _ = exact_search(queries, data, args.k, chunk=100)
    res["exact_seconds"] = round(time.perf_counter() - t0, 3)
    res["exact_cpu_seconds"] = round(time.process_time() - c0, 3)
    res["exact_qps"] = round(args.queries / res["exact_seconds"], 1)
    print(f"exact search: {res['exact_qps']:,} queries/s ({res['exact_seconds']} s wall, {res['exact_cpu_seconds']} s CPU)",
          flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    index = build_hnsw(data, args.m, args.ef_construction, args.seed, threads=args.threads)
    res["build_seconds"] = round(time.perf_counter() - t0, 2)
    res["build_cpu_seconds"] = round(time.process_time() - c0, 2)
    res["peak_mib_after_build"] = round(peak_mib(), 1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "index.bin")
        index.save_index(path)
        res["index_mib"] = round(os.path.getsize(path) / 2**20, 1)
    print(f"HNSW build: {res['build_seconds']} s wall, {res['build_cpu_seconds']} s CPU, index {res['index_mib']} MiB,"
          f" peak RSS {res['peak_mib_after_build']:.0f} MiB", flush=True)

    res["search"] = []
    for ef in [int(e) for e in args.ef.split(",")]:
        t0, c0 = time.perf_counter(), time.process_time()
        idx, _ = hnsw_search(index, queries, args.k, ef, threads=args.threads)
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(idx, ex_idx)]))
        row = {"ef": ef, "qps": round(args.queries / sec, 1), "recall_at_10": round(recall, 4), "seconds": round(sec, 3),
               "cpu_seconds": round(cpu, 3)}
        res["search"].append(row)
        print(f"HNSW ef={ef}: {row['qps']:,} queries/s ({cpu:.2f} s CPU), Recall@{args.k} vs exact {recall:.4f}",
              flush=True)
    res["peak_mib"] = round(peak_mib(), 1)
    print(f"peak RSS {res['peak_mib']:.0f} MiB")
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
