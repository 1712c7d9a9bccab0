"""Training speed: one Ray Train worker vs the framework-free loop on the same data; 2 workers vs 1.

Same method (OmniFuse), same embeddings (rendered from the synthetic truth), same epochs and
batch size. Samples/s = training samples x epochs / wall time of the fit (Ray: TorchTrainer.fit,
including worker start-up, the feed, per-epoch validation and checkpoints); CPU seconds of the loop's
process and of every process of the local Ray during the fit.

    python benchmarks/train_bench.py --n 4000 --epochs 5
    python benchmarks/train_bench.py --n 20000 --epochs 5 --workers 1 --sync-checkpoints --feed ray_data  # as before
    python benchmarks/train_bench.py --device cuda --n 50000 --batch-size 512   # GPU: fp32 vs mixed precision
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time



# the shared CPU meter (benchmarks/cpu_meter.py); this script's folder is on sys.path when run as a script
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_meter import TreeCpu  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--method", default="omnifuse")
    p.add_argument("--hidden-dim", type=int, default=32)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: every path on the GPU (Ray Train use_gpu=True, 1 worker), fp32 and precision=auto")
    p.add_argument("--ray-only", action="store_true", help="--device cuda: skip the framework-free loop runs")
    p.add_argument("--checkpoint-every", type=int, default=None, help="train.checkpoint_every (default: the config's)")
    p.add_argument("--sync-checkpoints", action="store_true", help="train.checkpoint_async=false (the former upload)")
    p.add_argument("--feed", choices=["auto", "memory", "ray_data"], default="auto", help="train.feed")
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to run (comma-separated)")
    p.add_argument("--json", default=None, help="also write the results here")
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
            f"train.batch_size={args.batch_size}", f"train.hidden_dim={args.hidden_dim}", "train.omnifuse.depth=3",
            f"train.method={args.method}", "ray.progress_bars=false", f"train.feed={args.feed}",
            f"train.checkpoint_async={not args.sync_checkpoints}",
            *([f"train.checkpoint_every={args.checkpoint_every}"] if args.checkpoint_every else [])]
    cfg = load_config(None, base)
    table = read_embeddings(emb)
    task, k = infer_task(table.y)
    split = assign_splits(table, cfg)
    meta = model_meta(cfg, table, task, k)
    tr, va = split == "train", split == "val"
    n_train = int(tr.sum())


    if args.device == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda but torch sees no CUDA device")
        return _gpu(args, base, table, split, meta, n_train)
    torch.set_num_threads(1)  # a Ray Train worker gets one CPU
    method = build_from_meta(meta)
    part = lambda m: ({x: v[m] for x, v in table.x.items()}, table.mask[m], table.y[m])  # noqa: E731
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    plain_hist = loop.fit(method, part(tr), part(va), task, epochs=args.epochs, batch_size=args.batch_size,
                          patience=1000)["history"]
    t_plain, cpu_plain = time.perf_counter() - t0, time.process_time() - c0

    rctx = init_ray(cfg)
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val")}
    times, cpu, epoch_s = {}, {}, {"loop": _steady_epoch_seconds(plain_hist)}
    epochs_sum = {"loop": sum(h["seconds"] for h in plain_hist)}
    counts = [int(w) for w in args.workers.split(",")]
    for workers in counts:
        c = load_config(None, base + [f"train.num_workers={workers}"])
        t0, meter = time.perf_counter(), TreeCpu().start()
        result = fit_torch_trainer(c, meta, ids["train"], ids["val"], f"bench-{workers}w-{time.time_ns()}",
                                   rctx.results_dir)
        times[workers], cpu[workers] = time.perf_counter() - t0, meter.stop()
        with result.checkpoint.as_directory() as d:
            hist = json.load(open(os.path.join(d, "history.json")))
        epoch_s[workers] = _steady_epoch_seconds(hist)
        epochs_sum[workers] = sum(h["seconds"] for h in hist)
    sps = lambda t: n_train * args.epochs / t  # noqa: E731
    tc = cfg.train
    from raypipe.train.trainer import CONTROLLER_POLL_S

    poll = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S))
    print(f"\ntrain benchmark: {args.method}, {n_train} training samples x {args.epochs} epochs, batch "
          f"{args.batch_size}, {os.cpu_count()} CPUs; feed {tc.feed}, checkpoint every {tc.checkpoint_every} "
          f"epoch(s) + best + last, {'async' if tc.checkpoint_async else 'sync'} upload, controller poll "
          f"{poll:g} s; load average "
          f"{load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"framework-free loop (1 thread): {sps(t_plain):8.0f} samples/s ({t_plain:.1f}s wall, {cpu_plain:.1f} CPU-s)")
    for w in counts:
        label = f"Ray Train, {w} worker{'s (DDP)' if w > 1 else ''}"
        print(f"{label:30s}: {sps(times[w]):8.0f} samples/s ({times[w]:.1f}s wall incl. start-up, {cpu[w]:.1f} CPU-s "
              "over every process of the local Ray)")
    if 1 in times:
        print(f"ratio 1 worker / loop: {t_plain / times[1]:.2f} wall, {cpu_plain / cpu[1]:.2f} CPU time (loop CPU-s / "
              "Ray CPU-s)" + (f"; 2 workers / 1 worker: {times[1] / times[2]:.2f}" if 2 in times else ""))
        print(f"steady state (median epoch after the first, training + validation + hooks): loop "
              f"{epoch_s['loop']:.2f}s, 1 worker {epoch_s[1]:.2f}s (ratio {epoch_s['loop'] / epoch_s[1]:.2f})"
              + (f", 2 workers {epoch_s[2]:.2f}s" if 2 in times else "")
              + "; the rest of the Ray wall time is start-up, dataset feed and checkpoint persistence")
        print("outside the epochs (wall - the epochs' own seconds; start-up, model and optimizer set-up, end): "
              + ", ".join(f"{'loop' if k == 'loop' else f'{k} worker(s)'} {(t_plain if k == 'loop' else times[k]) - v:.2f}s"
                          for k, v in epochs_sum.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": "cpu", "n_train": n_train, "epochs": args.epochs, "loop_s": t_plain,
                       "loop_cpu_s": cpu_plain, "ray_s": times, "ray_cpu_s": cpu, "steady_epoch_s": epoch_s,
                       "epochs_sum_s": epochs_sum,
                       "feed": tc.feed, "checkpoint_every": tc.checkpoint_every,
                       "checkpoint_async": tc.checkpoint_async, "controller_poll_s": poll,
                       "loadavg_start": load0}, fh, indent=2)


def _steady_epoch_seconds(history: list[dict]) -> float:
    """Median wall seconds of the epochs after the first (the first pays warm-up)."""
    import numpy as np

    secs = [h["seconds"] for h in history]
    return float(np.median(secs[1:] if len(secs) > 1 else secs))


def _gpu(args, base, table, split, meta, n_train):
    """One GPU: the framework-free loop and a 1-worker Ray Train run, each in fp32 and mixed precision."""
    import torch

    from raypipe.config import load_config
    from raypipe.runtime import init_ray
    from raypipe.train import loop
    from raypipe.train.trainer import build_from_meta, fit_torch_trainer

    tr, va = split == "train", split == "val"
    part = lambda m: ({x: v[m] for x, v in table.x.items()}, table.mask[m], table.y[m])  # noqa: E731
    res = {"device": torch.cuda.get_device_name(0), "n_train": n_train, "epochs": args.epochs,
           "batch_size": args.batch_size, "hidden_dim": args.hidden_dim}
    for prec in () if args.ray_only else ("fp32", "auto"):
        method = build_from_meta(meta).to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = loop.fit(method, part(tr), part(va), meta["task"], epochs=args.epochs, batch_size=args.batch_size,
                       patience=1000, device="cuda", precision=prec)
        torch.cuda.synchronize()
        res[f"loop_{prec}_s"] = time.perf_counter() - t0
        res[f"loop_{prec}_best_val"] = out["best_val"]
        res[f"loop_{prec}_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"loop {prec}: {res[f'loop_{prec}_s']:.1f}s, best val {out['best_val']:.4f}", flush=True)
        del method
    rctx = init_ray(load_config(None, base))
    ids = {s: set(table.sample_id[split == s]) for s in ("train", "val")}
    for prec in ("fp32", "auto"):
        c = load_config(None, base + ["train.use_gpu=true", f"train.precision={prec}"])
        t0 = time.perf_counter()
        fit_torch_trainer(c, meta, ids["train"], ids["val"], f"bench-gpu-{prec}-{time.time_ns()}", rctx.results_dir)
        res[f"ray_{prec}_s"] = time.perf_counter() - t0
        print(f"Ray Train {prec}: {res[f'ray_{prec}_s']:.1f}s", flush=True)
    sps = lambda t: n_train * args.epochs / t  # noqa: E731
    if args.ray_only:
        print({k: v for k, v in res.items()})
        return res
    print(f"\ntrain benchmark on {res['device']}: {args.method}, {n_train} training samples x {args.epochs} epochs, "
          f"batch {args.batch_size}, D={args.hidden_dim}")
    for prec in ("fp32", "auto"):
        print(f"loop {prec:4s}: {sps(res[f'loop_{prec}_s']):9.0f} samples/s, best val {res[f'loop_{prec}_best_val']:.4f},"
              f" peak {res[f'loop_{prec}_peak_mib']:.0f} MiB; Ray Train 1 GPU worker: "
              f"{sps(res[f'ray_{prec}_s']):9.0f} samples/s ({res[f'ray_{prec}_s']:.1f}s incl. start-up)")
    print(f"ratio Ray/loop (auto precision): {res['loop_auto_s'] / res['ray_auto_s']:.2f}; "
          f"mixed/fp32 speed-up (loop): {res['loop_fp32_s'] / res['loop_auto_s']:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
