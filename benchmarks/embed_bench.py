"""Embedding speed: the Ray Data actor-pool path vs a plain PyTorch loop on the same slices.

(a) plain loop: the same ResNet34 (ImageEmbedder) over pre-decoded tensors held in memory,
    same batch size, one process;
(b) `run_embed`: records (Parquet) -> actor pool -> aggregation -> embeddings table.
Prints items/s of both and the ratio (b)/(a). On a GPU (`--device cuda`) it also samples
GPU utilisation (nvidia-smi) and reports peak GPU memory.

    python benchmarks/embed_bench.py                     # CPU: 2048 slices at 64x64
    python benchmarks/embed_bench.py --n 100000 --input-size 224 --device cuda --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time

import numpy as np


def write_records(root: str, n: int, size: int, per_sample: int = 16) -> None:
    """n single-channel slices as records (per_sample slices per sample) plus a samples table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.schema import RECORDS_SCHEMA, array_to_payload, samples_schema

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "records"), exist_ok=True)
    rows, ids = [], []
    for i in range(n):
        sid = f"s{i // per_sample:07d}"
        if not ids or ids[-1] != sid:
            ids.append(sid)
        img = rng.random((1, size, size), dtype=np.float32)
        rows.append({"sample_id": sid, "modality": "ct", "source_key": "k", "position": i % per_sample,
                     **array_to_payload(img), "text": None, "meta": "{}"})
        if len(rows) == 4096 or i == n - 1:
            pq.write_table(pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA),
                           os.path.join(root, "records", f"part-{i:08d}.parquet"))
            rows = []
    sch = samples_schema(["label"], ["split"])
    pq.write_table(pa.table({"sample_id": ids, "label": [float(j % 2) for j in range(len(ids))],
                             "split": ["train"] * len(ids)}, schema=sch), os.path.join(root, "samples.parquet"))


class GPUSampler:
    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()

    def __enter__(self):
        def run():
            while not self._stop.is_set():
                try:
                    out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout.split()
                    self.samples.append(float(out[0]))
                except Exception:  # noqa: BLE001 - no nvidia-smi: no samples
                    return
                time.sleep(0.5)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--pool-size", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from raypipe.config import load_config
    from raypipe.embed.image import ImageEmbedder
    from raypipe.embed.pipeline import run_embed
    from raypipe.runtime import init_ray

    work = tempfile.mkdtemp(prefix="rp-embed-bench-")
    write_records(work, args.n, args.input_size)
    threads = max(1, (os.cpu_count() or 2) - 1) if args.device == "cpu" else 1
    torch.set_num_threads(threads)
    emb = ImageEmbedder(weights="random", input_size=args.input_size, device=args.device)
    data = np.random.default_rng(0).random((args.n, 1, args.input_size, args.input_size), dtype=np.float32)
    emb(data[:args.batch_size])  # warm-up
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(0, args.n, args.batch_size):
        emb(data[i:i + args.batch_size])
    t_plain = time.perf_counter() - t0
    peak_plain = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None

    overrides = [f"run.out_dir={work}/run", f"embed.input={work}", f"embed.out={work}/emb", "ray.progress_bars=false",
                 "embed.image.weights=random", f"embed.image.input_size={args.input_size}",
                 f"embed.batch_size={args.batch_size}",
                 f"ingest.modalities={{ct: {{kind: volume, size: {args.input_size}}}}}"]
    if args.pool_size:
        overrides.append(f"embed.pool_size={args.pool_size}")
    cfg = load_config(None, overrides)
    init_ray(cfg)
    with GPUSampler() as gpu:
        t0 = time.perf_counter()
        run_embed(cfg)
        t_ray = time.perf_counter() - t0
    print(f"\nembed benchmark: ResNet34 ({'random' if True else ''} weights), {args.n} slices "
          f"{args.input_size}x{args.input_size}, batch {args.batch_size}, device {args.device}, "
          f"{os.cpu_count()} CPUs (plain loop with {threads} torch threads)")
    print(f"plain loop : {args.n / t_plain:8.1f} images/s ({t_plain:.1f}s)")
    print(f"ray data   : {args.n / t_ray:8.1f} images/s ({t_ray:.1f}s, records -> embeddings table incl. start-up)")
    print(f"ratio (ray/plain): {t_plain / t_ray:.2f}")
    if gpu.samples:
        print(f"GPU busy: mean {np.mean(gpu.samples):.0f}% over {len(gpu.samples)} samples; "
              f"peak GPU memory (plain) {peak_plain:.0f} MiB")


if __name__ == "__main__":
    main()
