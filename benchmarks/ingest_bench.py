"""Ingest speed: the Ray Data pipeline vs a plain single-process loop on the same DICOM slices.

(a) plain loop: for every CT file, pydicom read + rescale + window + the same Lanczos resize;
(b) `run_ingest` (header pass, grouping/ordering, decode pass, sort, Parquet write) with
    every slice selected. Prints slices/s of both, the ratio (b)/(a), and the peak memory
    (driver + Ray workers, RSS summed) at 1x and 4x the cohort size.

    python benchmarks/ingest_bench.py                  # 1x = 90 patients x 24 slices = 2160 CT slices
    python benchmarks/ingest_bench.py --patients 30 --scales 1
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import threading
import time


class PeakRSS:
    """Samples the summed RSS of this process and its children (Ray workers) every 0.2 s."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _total(self) -> int:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._total())
                time.sleep(0.2)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def plain_loop(files: list[str], size: int) -> int:
    from raypipe.ingest.dicom import decode_slice

    for f in files:
        decode_slice(f, size, (-1000.0, 400.0))
    return len(files)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=90)
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--image-size", type=int, default=128, help="synthetic in-plane size")
    p.add_argument("--size", type=int, default=64, help="output size of the resize")
    p.add_argument("--scales", default="1,4", help="cohort multiples for the memory check")
    args = p.parse_args(argv)

    from raypipe.config import load_config
    from raypipe.ingest.pipeline import run_ingest
    from raypipe.runtime import init_ray
    from raypipe.synth.clinical import write_clinical_cohort

    os.environ.setdefault("RAYPIPE_ID_SECRET", "benchmark-secret")
    work = tempfile.mkdtemp(prefix="rp-ingest-bench-")
    rows = []
    ray_started = False
    for scale in [int(s) for s in args.scales.split(",")]:
        cohort = os.path.join(work, f"cohort{scale}")
        n = args.patients * scale
        write_clinical_cohort(cohort, n=n, seed=scale, slices=args.slices, image_size=args.image_size,
                              missing_rate={"ct": 0.0, "pet": 1.0, "ehr": 1.0, "report": 1.0}, mnar={})
        files = sorted(glob.glob(os.path.join(cohort, "patients", "*", "ct", "*.dcm")))
        cfg = load_config(None, [f"run.out_dir={os.path.join(work, f'run{scale}')}", f"ingest.input={cohort}",
                                 "ray.progress_bars=false",
                                 f"ingest.modalities={{ct: {{kind: volume, window: [-1000, 400], size: {args.size}, "
                                 "slices: {policy: all}}}"])
        if not ray_started:
            init_ray(cfg)
            ray_started = True
        t0 = time.perf_counter()
        with PeakRSS() as mem_plain:
            plain_loop(files, args.size)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        with PeakRSS() as mem_ray:
            summary = run_ingest(cfg)
        t_ray = time.perf_counter() - t0
        assert summary["records"] == len(files), summary
        rows.append((scale, len(files), len(files) / t_plain, len(files) / t_ray, mem_plain.peak, mem_ray.peak))
    print(f"\ningest benchmark: {os.cpu_count()} CPUs, CT DICOM {args.image_size}px -> {args.size}px")
    print(f"{'scale':>5} {'slices':>7} {'plain slices/s':>15} {'ray slices/s':>13} {'ratio':>6} "
          f"{'peak RSS plain':>15} {'peak RSS ray':>13}")
    for scale, n, a, b, ma, mb in rows:
        print(f"{scale:>5} {n:>7} {a:>15.1f} {b:>13.1f} {b / a:>6.2f} {ma / 2**20:>13.0f}MB {mb / 2**20:>11.0f}MB")


if __name__ == "__main__":
    main()
