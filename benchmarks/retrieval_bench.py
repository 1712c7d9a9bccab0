"""Vector-search speed and accuracy: the HNSW index of `raypipe retrieve query` against exact search.

Builds an inner-product HNSW index (hnswlib, through ``raypipe.retrieve.pipeline.build_hnsw``)
over N synthetic unit vectors, queries it, and measures against exact numpy search
(``raypipe.retrieve.align.exact_search``, the reference):

- index build time (wall and CPU seconds) and the index's size on disk;
- queries/s of the index for each ``--ef`` (search breadth) and of exact search (wall and CPU seconds:
  on a shared machine the CPU seconds are the steadier number);
- Recall@10 of the index against exact search (share of the exact top 10 the index returns);
- peak resident memory of the process (``ru_maxrss``) after data, after exact search, after build,
  at the end, against the machine's total memory; a pre-flight estimate (vectors + index + the
  exact search's working memory) stops the run before it starts if it cannot fit in the memory
  available now;
- the 1/5/15-minute load average before and after each step (a shared machine: wall times
  under load are longer than on an idle one, CPU seconds much less so).

Exact search (the reference) runs as blocked float32 matrix products, ``--exact-chunk`` queries
against ``--gallery-chunk`` vectors at a time, so its working memory stays bounded (about
12 bytes x the two chunk sizes). The index is built with ``--threads`` threads in slices of
``--build-batch`` vectors, with a progress line per slice.

Data: a Gaussian mixture in ``--dim`` dimensions (``--clusters`` centres drawn N(0, 1),
points = centre + N(0, ``--spread``^2) noise, L2-normalised), i.e. embedding-like data with
cluster structure; queries are fresh draws from the same mixture (not in the index).
Threads: ``--threads`` for hnswlib and the BLAS of exact search (the issue's "2 cores").

    nice -n 5 python benchmarks/retrieval_bench.py --n 1000000 --json /tmp/bench1m.json  # the issue's size (~3 GiB)
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
    p.add_argument("--exact-chunk", type=int, default=250, help="queries per exact-search block")
    p.add_argument("--gallery-chunk", type=int, default=65536, help="indexed vectors per exact-search block")
    p.add_argument("--build-batch", type=int, default=100_000, help="vectors per build slice (progress line)")
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

    def load() -> list:
        return [round(x, 2) for x in os.getloadavg()]

    def meminfo_mib(key: str) -> float:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
        return float("nan")

    from importlib.metadata import version as _version

    hnswlib_version = _version("hnswlib")

    # pre-flight: vectors + HNSW index (vector + 2*M level-0 links + label/header per element, measured
    # 1.1 GiB per million at 256-d, M = 16) + exact search's blocks, against the memory available now
    vec_mib = args.n * args.dim * 4 / 2**20
    index_mib_est = args.n * (args.dim * 4 + args.m * 2 * 4 + 4 + 8 + 8) / 2**20 * 1.05
    exact_mib_est = args.exact_chunk * min(args.gallery_chunk, args.n) * 12 / 2**20
    need = vec_mib + index_mib_est + exact_mib_est + 400  # + Python, numpy, hnswlib
    total, avail = meminfo_mib("MemTotal"), meminfo_mib("MemAvailable")
    print(f"memory: need about {need:,.0f} MiB (vectors {vec_mib:,.0f}, index {index_mib_est:,.0f}, exact-search "
          f"blocks {exact_mib_est:,.0f}); machine {total:,.0f} MiB, available now {avail:,.0f} MiB", flush=True)
    if need > avail:
        print("not enough memory available now: not starting", file=sys.stderr)
        return None
    run_c0, run_t0 = time.process_time(), time.perf_counter()

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
           "exact_chunk": args.exact_chunk, "gallery_chunk": args.gallery_chunk, "hnswlib": hnswlib_version,
           "numpy": np.__version__, "cpus_online": os.cpu_count(), "nice": os.nice(0),
           "mem_total_mib": round(total), "mem_available_mib_at_start": round(avail),
           "memory_estimate_mib": round(need),
           "data_seconds": round(time.perf_counter() - t0, 2), "peak_mib_after_data": round(peak_mib(), 1),
           "load_start": load()}
    print(f"data: {args.n:,} x {args.dim} float32 ({data.nbytes / 2**20:.0f} MiB) in {res['data_seconds']} s; "
          f"load average {res['load_start']}", flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    ex_idx, _ = exact_search(queries, data, args.k, chunk=args.exact_chunk, gallery_chunk=args.gallery_chunk)
    res["exact_seconds"] = round(time.perf_counter() - t0, 3)
    res["exact_cpu_seconds"] = round(time.process_time() - c0, 3)
    res["exact_qps"] = round(args.queries / res["exact_seconds"], 1)
    res["peak_mib_after_exact"] = round(peak_mib(), 1)
    res["load_after_exact"] = load()
    print(f"exact search: {res['exact_qps']:,} queries/s ({res['exact_seconds']} s wall, {res['exact_cpu_seconds']} s CPU),"
          f" peak RSS {res['peak_mib_after_exact']:.0f} MiB; load average {res['load_after_exact']}", flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    res["build_progress"] = []

    def progress(done: int) -> None:
        row = {"vectors": done, "seconds": round(time.perf_counter() - t0, 1),
               "cpu_seconds": round(time.process_time() - c0, 1), "load": load()}
        res["build_progress"].append(row)
        print(f"  build: {done:,} vectors, {row['seconds']} s wall, {row['cpu_seconds']} s CPU; load average "
              f"{row['load']}", flush=True)

    index = build_hnsw(data, args.m, args.ef_construction, args.seed, threads=args.threads,
                       batch=args.build_batch, progress=progress)
    res["build_seconds"] = round(time.perf_counter() - t0, 2)
    res["build_cpu_seconds"] = round(time.process_time() - c0, 2)
    res["peak_mib_after_build"] = round(peak_mib(), 1)
    res["load_after_build"] = load()
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
    res["load_end"] = load()
    res["total_seconds"] = round(time.perf_counter() - run_t0, 1)
    res["total_cpu_seconds"] = round(time.process_time() - run_c0, 1)
    print(f"peak RSS {res['peak_mib']:,.0f} MiB of {total:,.0f} MiB ({100 * res['peak_mib'] / total:.1f} %); "
          f"total {res['total_seconds']} s wall, {res['total_cpu_seconds']} s CPU; load average {res['load_end']}")
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
