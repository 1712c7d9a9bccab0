"""Ingest speed and memory: the Ray Data pipeline vs a plain single-process loop on the same DICOM slices.

(a)  plain loop: for every CT file, ``pydicom.dcmread`` + ``pixel_array`` + ``apply_modality_lut``
     + the same lung window + the same Lanczos resize (what one writes without raypipe);
(a3) loop (a) that also writes what it decoded as (b) stores it (uint8 fixed-shape tensor column,
     zstd, byte-stream split; pyarrow only): the like-for-like reference, printed beside the goal's ratio;
(a') the same loop calling raypipe's decoder (``raypipe.ingest.dicom.decode_slice``: native fast
     path, functional-group rescale, checks), to separate decoder speed from parallelism;
(b)  ``run_ingest``: header pass, grouping/ordering, decode pass, Parquet write, reconciliation,
     with every slice selected (``slices.policy: all``).

Prints slices/s of each, the ratio (b)/(a) (the goal: >= 1.5 on 2 cores) and (b)/(a'), the
records' size on disk per slice (KB; goal <= 60 for 224x224 with the default uint8 payloads;
``--payload-dtype float32`` for the float32 layout), the CPU seconds per slice of (a) and of (b)
and their ratio (b)/(a) (goal <= 1.2; CPU time, unlike wall time, does not depend on what else the
machine runs) -- split by process: the driver, the Ray workers that
run the decode tasks, Ray's own processes (raylet, GCS, dashboard) -- and the peak memory of (b)
(driver plus every Ray process, RSS summed over the process tree, sampled every 0.1 s in an
extra run so that the sampler does not slow the timed ones) at 1x and 4x the cohort size:
streaming keeps it flat.

    python benchmarks/ingest_bench.py                     # 90 patients x 24 slices = 2160 slices (1x), 4x
    python benchmarks/ingest_bench.py --patients 30 --scales 1 --repeats 1
    python benchmarks/ingest_bench.py --patients 20 --scales 1 --repeats 1 --payload-dtype float32
    python benchmarks/ingest_bench.py --scales 1 --set ingest.tensor_columns=false   # payload bytes layout
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import threading
import time


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (Ray's raylet and workers)."""

    def __init__(self, interval: float = 0.1):
        import ray  # noqa: F401 - Ray ships psutil in its vendored packages
        import psutil

        self.proc, self.peak, self.interval, self._stop = psutil.Process(), 0, interval, threading.Event()

    def _total(self) -> int:
        import ray  # noqa: F401
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
                time.sleep(self.interval)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def tree_cpu_by_role() -> dict[str, float]:
    """User + system CPU seconds of this process and its live descendants, by role: ``driver`` (this
    process), ``workers`` (Ray worker processes: the decode tasks) and ``ray`` (raylet, GCS, dashboard...).
    Live processes only: to measure an interval use :class:`TreeCPU`."""
    import ray  # noqa: F401 - Ray ships psutil in its vendored packages
    import psutil

    me = psutil.Process()
    out = {"driver": 0.0, "workers": 0.0, "ray": 0.0}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name = " ".join(p.cmdline()[:1])
        except psutil.Error:
            continue
        role = "driver" if p.pid == me.pid else "workers" if name.startswith("ray::") and "Actor" not in name \
            and "DashboardAgent" not in name and "RuntimeEnv" not in name else "ray"
        out[role] += t.user + t.system
    return out


def _tree_snapshot() -> dict[tuple[int, float], tuple[str, float]]:
    """{(pid, start time): (role, user + system CPU seconds)} of this process and its live descendants
    (zombies included); keyed with the start time so that a pid the OS reuses is another process."""
    import ray  # noqa: F401 - Ray ships psutil in its vendored packages
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t, born = p.cpu_times(), p.create_time()
        except psutil.Error:
            continue
        try:
            name = " ".join(p.cmdline()[:1])
        except psutil.Error:  # exited, not reaped yet
            name = "exited"
        role = "driver" if p.pid == me.pid else "workers" if name.startswith("ray::") and "Actor" not in name \
            and "DashboardAgent" not in name and "RuntimeEnv" not in name else "ray"
        out[(p.pid, born)] = (role, t.user + t.system)
    return out


class TreeCPU:
    """CPU seconds this process tree spends inside the ``with`` block, by role (driver / workers / ray).

    Per process: its CPU at the last sample minus its CPU on entry (0 for a process started inside).
    A thread samples the tree every ``interval`` s, so a process that exits inside the block counts
    its CPU up to its last sample. (A difference of two :func:`tree_cpu_seconds` calls subtracts the
    whole lifetime CPU of every process that exited in between -- Ray ends idle workers a few seconds
    after a pass -- and understated the Ray paths' CPU, by up to half in a short pass.) The sampler's
    own CPU (~1 ms a sample) counts in the driver's.
    """

    def __init__(self, interval: float = 0.25):
        import threading

        self.interval, self._stop, self._thread = interval, threading.Event(), None
        self.first: dict[tuple[int, float], tuple[str, float]] = {}
        self.last: dict[tuple[int, float], tuple[str, float]] = {}

    def _sample(self) -> None:
        self.last.update(_tree_snapshot())

    def __enter__(self) -> "TreeCPU":
        import threading

        self.first = _tree_snapshot()
        self.last = dict(self.first)

        def run():
            while not self._stop.wait(self.interval):
                self._sample()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_pid(self) -> dict[tuple[int, float], tuple[str, float]]:
        """{(pid, start time): (role, CPU seconds inside the block)}."""
        return {key: (role, c - self.first.get(key, (role, 0.0))[1]) for key, (role, c) in self.last.items()}

    def so_far(self) -> float:
        """CPU seconds of the whole tree from entry until now (samples the tree once more)."""
        self._sample()
        return sum(c for _, c in self.by_pid().values())

    def by_role(self) -> dict[str, float]:
        out = {"driver": 0.0, "workers": 0.0, "ray": 0.0}
        for role, c in self.by_pid().values():
            out[role] += c
        return out

    @property
    def seconds(self) -> float:
        return sum(self.by_role().values())


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (Ray's raylet, GCS, workers)."""
    return sum(tree_cpu_by_role().values())


def plain_pydicom_loop(files: list[str], size: int, window=(-1000.0, 400.0)) -> int:
    """(a): the loop one writes with pydicom alone (plus the same window and resize as raypipe)."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from raypipe.ingest.common import apply_window, resize_plane

    for f in files:
        ds = pydicom.dcmread(f)
        hu = apply_modality_lut(ds.pixel_array, ds)
        img = resize_plane(apply_window(hu, window), size)
        np.clip(img, 0, 1)
    return len(files)


def plain_loop_writing_records(files: list[str], size: int, out_dir: str, per_file: int = 128,
                               window=(-1000.0, 400.0)) -> int:
    """(a3): loop (a) that also stores what it decoded, as (b) does: uint8 slices in a fixed-shape tensor
    column, Parquet with zstd and byte-stream-split values, ``per_file`` slices a file (pyarrow only, no
    raypipe code but the window and resize). The like-for-like reference for (b)'s CPU per slice."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pydicom
    from pydicom.pixels import apply_modality_lut

    from raypipe.ingest.common import apply_window, resize_plane

    os.makedirs(out_dir, exist_ok=True)
    typ = pa.fixed_shape_tensor(pa.uint8(), [1, size, size])
    for start in range(0, len(files), per_file):
        chunk = files[start:start + per_file]
        imgs = np.empty((len(chunk), size * size), np.uint8)
        for i, f in enumerate(chunk):
            ds = pydicom.dcmread(f)
            img = np.clip(resize_plane(apply_window(apply_modality_lut(ds.pixel_array, ds), window), size), 0, 1)
            imgs[i] = np.rint(img * 255).reshape(-1)
        col = pa.ExtensionArray.from_storage(typ, pa.FixedSizeListArray.from_arrays(pa.array(imgs.reshape(-1)), size * size))
        table = pa.table({"path": chunk, "tensor": col})
        pq.write_table(table, os.path.join(out_dir, f"part-{start // per_file:05d}.parquet"), compression="zstd",
                       use_dictionary=False, use_byte_stream_split=["tensor.list.element"])
    return len(files)


def raypipe_decoder_loop(files: list[str], size: int) -> int:
    """(a'): the same loop with raypipe's decoder."""
    from raypipe.ingest.dicom import decode_slice

    for f in files:
        decode_slice(f, size, (-1000.0, 400.0), expected={"CT"})
    return len(files)


def _timed(fn, *args):
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _cpu(fn, *args):
    with TreeCPU() as meter:
        fn(*args)
    return meter.seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=90)
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--image-size", type=int, default=256, help="synthetic in-plane size of the DICOM slices")
    p.add_argument("--size", type=int, default=224, help="model input size (output of the resize)")
    p.add_argument("--scales", default="1,4", help="cohort multiples (memory must stay flat)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant (the best is reported)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray (the goal is set for 2)")
    p.add_argument("--items-per-task", type=int, default=None, help="ingest.items_per_task (default: the config's)")
    p.add_argument("--work", help="directory for cohorts and outputs (default: a temporary one)")
    p.add_argument("--payload-dtype", choices=["uint8", "float16", "float32"], default=None,
                   help="ingest.payload_dtype (default: the config's, uint8)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any further config override, e.g. ingest.tensor_columns=false (repeatable)")
    p.add_argument("--worker-niceness", type=int, default=0,
                   help="nice value of the local Ray's workers (Ray's default is 15: on a machine shared with "
                        "other work they would get less CPU than the plain loop at nice 0)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_worker_niceness", str(args.worker_niceness))

    from raypipe.config import load_config
    from raypipe.ingest.pipeline import run_ingest
    from raypipe.runtime import init_ray
    from raypipe.synth.clinical import write_clinical_cohort

    os.environ.setdefault("RAYPIPE_ID_SECRET", "benchmark-secret")
    work = args.work or tempfile.mkdtemp(prefix="rp-ingest-bench-")
    rows, role_rows = [], []
    load_start = os.getloadavg()[0]
    ray_started = False
    for scale in [int(s) for s in args.scales.split(",")]:
        cohort = os.path.join(work, f"cohort{scale}")
        n = args.patients * scale
        if not os.path.isfile(os.path.join(cohort, "manifest.csv")):
            write_clinical_cohort(cohort, n=n, seed=scale, slices=args.slices, image_size=args.image_size,
                                  missing_rate={"ct": 0.0, "pet": 1.0, "ehr": 1.0, "report": 1.0}, mnar={})
        files = sorted(glob.glob(os.path.join(cohort, "patients", "*", "ct", "*.dcm")))
        cfg = load_config(None, [f"run.out_dir={os.path.join(work, f'run{scale}')}", f"ingest.input={cohort}",
                                 "ray.progress_bars=false", f"ray.num_cpus={args.num_cpus}",
                                 *([f"ingest.items_per_task={args.items_per_task}"] if args.items_per_task else []),
                                 *([f"ingest.payload_dtype={args.payload_dtype}"] if args.payload_dtype else []),
                                 f"ingest.modalities={{ct: {{kind: volume, window: [-1000, 400], size: {args.size}, "
                                 "slices: {policy: all}}}", *args.overrides])
        if not ray_started:
            init_ray(cfg)
            ray_started = True
            run_ingest(cfg)  # warm-up: worker processes and imports, as on a long-running cluster
        t_plain = min(_timed(plain_pydicom_loop, files, args.size) for _ in range(args.repeats))
        t_dec = min(_timed(raypipe_decoder_loop, files, args.size) for _ in range(args.repeats))
        cpu_plain = _cpu(plain_pydicom_loop, files, args.size)
        plain_loop_writing_records(files[:8], args.size, os.path.join(work, "plain_warmup"))  # imports, as (b)'s warm-up
        cpu_plain_rec = _cpu(plain_loop_writing_records, files, args.size, os.path.join(work, f"plain_records{scale}"))
        t_ray, peaks, cpu_ray, roles = [], [], [], []
        for _ in range(args.repeats):  # timed without the memory sampler (its CPU would count against (b))
            with TreeCPU() as meter:
                t0 = time.perf_counter()
                summary = run_ingest(cfg)
                t_ray.append(time.perf_counter() - t0)
            roles.append(meter.by_role())
            cpu_ray.append(sum(roles[-1].values()))
            assert summary["records"] == len(files) and summary["reconciled"], summary
        with PeakRSS() as mem:  # one more run for the peak memory
            run_ingest(cfg)
        peaks.append(mem.peak)
        disk = sum(os.path.getsize(f) for f in glob.glob(os.path.join(cfg.records_dir, "records", "*.parquet")))
        rows.append((scale, len(files), len(files) / t_plain, len(files) / t_dec, len(files) / min(t_ray),
                     statistics.median(peaks), cpu_plain / len(files), min(cpu_ray) / len(files),
                     disk / len(files), cpu_plain_rec / len(files)))
        best = roles[cpu_ray.index(min(cpu_ray))]
        role_rows.append((scale, {k: v / len(files) for k, v in best.items()}))
    print(f"\ningest benchmark: {os.cpu_count()} CPUs on the machine (load average {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end), "
          f"Ray with {args.num_cpus} (worker niceness {os.environ['RAY_worker_niceness']}); CT DICOM "
          f"{args.image_size}px -> {args.size}px, best of {args.repeats}; records {cfg.ingest.payload_dtype}"
          f"{', tensor columns' if cfg.ingest.tensor_columns else ', payload bytes (ingest.tensor_columns=false)'}"
          f"{'; --set ' + ' '.join(args.overrides) if args.overrides else ''}")
    print(f"{'scale':>5} {'slices':>7} {'(a) pydicom/s':>14} {'(a2) decoder/s':>15} {'(b) ray/s':>10} "
          f"{'(b)/(a)':>8} {'(b)/(a2)':>9} {'peak RSS (b)':>13} {'CPU ms/slice (a)':>17} {'(b)':>6} "
          f"{'CPU (b)/(a)':>12} {'KB/slice':>9}")
    for scale, n, a, a2, b, mb, ca, cb, kb, _ in rows:
        print(f"{scale:>5} {n:>7} {a:>14.1f} {a2:>15.1f} {b:>10.1f} {b / a:>8.2f} {b / a2:>9.2f} "
              f"{mb / 2**20:>11.0f}MB {ca * 1e3:>17.2f} {cb * 1e3:>6.2f} {cb / ca:>12.2f} {kb / 1e3:>9.1f}")
    print(f"records on disk: {rows[0][8] / 1e3:.1f} KB per {args.size}x{args.size} slice ({cfg.ingest.payload_dtype}, "
          f"zstd; goal <= 60 KB at 224x224; float32 uncompressed was {4 * args.size ** 2 / 1e3:.1f} KB)")
    print(f"CPU-seconds per slice, Ray path / plain loop: {rows[0][7] / rows[0][6]:.2f} (goal <= 1.2), wall-clock "
          f"ratio (b)/(a) {rows[0][4] / rows[0][2]:.2f}")
    print(f"like for like: (a3) = (a) + the same uint8 records written by pyarrow alone: CPU {rows[0][9] * 1e3:.2f} "
          f"ms/slice; (b)/(a3) {rows[0][7] / rows[0][9]:.2f}")
    for scale, r in role_rows:
        print(f"(b) CPU ms/slice by process, {scale}x: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r.items()))
    if len(rows) > 1:
        print(f"peak memory {rows[-1][0]}x / {rows[0][0]}x cohort: {rows[-1][5] / rows[0][5]:.2f}")
    # CPU seconds do not depend on what else the machine runs: the ceiling of (b)/(a) on N idle cores
    ca, cb = rows[0][6], rows[0][7]
    print(f"CPU per slice: (a) {ca * 1e3:.2f} ms, (b) {cb * 1e3:.2f} ms (driver + Ray processes + workers); "
          f"on {args.num_cpus} idle cores (b)/(a) can reach at most {args.num_cpus * ca / cb:.2f}")


if __name__ == "__main__":
    main()
