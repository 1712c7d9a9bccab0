"""A quiet console: raypipe's lines on the terminal, Ray's internals in <out_dir>/logs/ray.log.

The router and the worker mark are checked directly (fast); `raypipe demo` itself runs in a
subprocess without a terminal, and its printed lines are counted and searched (slow).
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from raypipe import console

#: what Ray prints that a quiet console must not show (the issue's list, and Ray's line shapes)
RAY_MARKERS = ("Deprecat", "worker processes have been started", "core_worker", "PreemptionWatcher",
               "Progress bars disabled", "logging_progress", "streaming_executor", "(raylet)", "pid=",
               "Traceback", "Execution plan of Dataset", "Token authentication", "UserWarning")


def _env():
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def test_router_shows_marked_worker_lines_and_files_everything(caplog):
    buf = io.StringIO()
    epoch = "07:00:01 INFO raypipe.train.trainer: omnifuse epoch 1/3, train loss 0.7000, 1.0s"
    deprecation = ("/x/execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` "
                   "is deprecated")
    with caplog.at_level(logging.INFO, logger=console.FILE_ONLY):
        console.route_lines({"lines": [console.MARK + epoch, deprecation], "pid": 12,
                             "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "is_err": True}, console=buf)
        console.route_lines({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: ..."],
                             "pid": "raylet", "is_err": False}, console=buf)
    assert buf.getvalue() == epoch + "\n"  # the mark is gone, nothing else reached the console
    logged = [r.getMessage() for r in caplog.records if r.name == console.FILE_ONLY]
    assert len(logged) == 3
    assert logged[0].startswith("(RayTrainWorker pid=12") and logged[0].endswith(console.MARK + epoch)
    assert "RayDeprecationWarning" in logged[1]
    assert logged[2].startswith("(raylet) WARNING: 8 PYTHON worker processes")


def test_worker_setup_marks_raypipe_records_only():
    code = textwrap.dedent("""
        import logging
        from raypipe import console
        console.worker_setup(); console.worker_setup()  # idempotent: one handler
        logging.getLogger("raypipe.train.trainer").info("epoch line")
        logging.getLogger("raypipe.train.trainer").debug("not shown")
        logging.getLogger("ray.data").warning("Ray's own")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    marked = [ln for ln in r.stderr.splitlines() if ln.startswith(console.MARK)]
    assert len(marked) == 1 and marked[0].endswith("INFO raypipe.train.trainer: epoch line")
    assert "not shown" not in r.stderr


def test_progress_bars_need_a_terminal_on_a_quiet_console(monkeypatch):
    from raypipe.config import Config

    cfg = Config()
    monkeypatch.setattr(console, "_state", {**console._state, "verbose": False})
    for tty, quiet, bars, want in [(False, True, True, False), (True, True, True, True), (False, False, True, True),
                                   (True, True, False, False), (True, False, False, False)]:
        monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty, raising=False)
        cfg.ray.quiet, cfg.ray.progress_bars = quiet, bars
        assert console.bars_wanted(cfg) is want, (tty, quiet, bars)
    cfg.ray.quiet, cfg.ray.progress_bars = True, True
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    console._state["verbose"] = True  # -v: Ray's and raypipe's bars as they would be
    assert console.bars_wanted(cfg) is True


def test_a_notebook_output_area_gets_bars_though_it_is_no_terminal(monkeypatch):
    """Jupyter's stdout (ipykernel's OutStream) says isatty() False but shows a bar in place."""
    from raypipe.config import Config

    class OutStream:  # stands in for ipykernel.iostream.OutStream (ipykernel is not installed here)
        def isatty(self):
            return False

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    class Pipe:  # a pipe's stream, the same methods
        isatty, write, flush = OutStream.isatty, OutStream.write, OutStream.flush

    class Wrapped(OutStream):  # a subclass of the kernel's stream from another package is still on screen
        pass

    Wrapped.__module__ = "somepackage"

    OutStream.__module__ = "ipykernel.iostream"
    cfg = Config()
    cfg.ray.quiet, cfg.ray.progress_bars = True, True
    monkeypatch.setattr(console, "_state", {**console._state, "verbose": False})
    monkeypatch.setattr(sys, "stdout", OutStream())
    assert console.on_screen() and console.bars_wanted(cfg) and console.interactive(cfg)
    import ray.data

    from raypipe.runtime import configure_data_context

    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "enable_progress_bars", ctx.enable_progress_bars)
    configure_data_context(cfg)
    assert ctx.enable_progress_bars is True  # Ray Data's bar too
    monkeypatch.setattr(sys, "stdout", Wrapped())
    assert console.on_screen()
    Pipe.__module__ = "io"
    monkeypatch.setattr(sys, "stdout", Pipe())
    assert not console.on_screen() and not console.bars_wanted(cfg)
    configure_data_context(cfg)
    assert ctx.enable_progress_bars is False


def test_native_error_lines_of_the_driver_go_to_the_run_log(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys
        from raypipe import console
        console.open_run_log({str(tmp_path)!r})
        assert console.capture_native_stderr()
        os.write(2, b"[2026-12-01 07:06:32,325 E 6601 6601] core_worker.cc:2465: Actor with class name: "
                    b"'MapWorker(MapBatches(ImageActor))' has constructor arguments in the object store\\n")
        os.write(2, b"a line of our own\\n")
        sys.stderr.write("progress 50%\\r")  # a partial line (a progress bar) is passed on at once
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 0, r.stderr
    assert "a line of our own" in r.stderr and "progress 50%" in r.stderr
    assert "core_worker" not in r.stderr
    log_text = (tmp_path / "logs" / "ray.log").read_text()
    assert "core_worker.cc:2465" in log_text and "a line of our own" not in log_text


@pytest.mark.slow
def test_demo_prints_only_raypipe_lines_without_a_tty(tmp_path):
    """`raypipe demo` on a small cohort, stdout/stderr are pipes (no TTY): at most 60 lines, no Ray internals."""
    out = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(sys.executable), "raypipe"), "demo", "--out-dir", str(out), "--n", "16",
           "--set", "synth.slices=6", "--set", "synth.image_size=32",
           "--set", "ingest.modalities.ct={kind: volume, window: [-1000, 400], size: 32, slices: {policy: even, n: 4}}",
           "--set", "ingest.modalities.pet={kind: volume, window: [0, 10], size: 32, slices: {policy: even, n: 4}}",
           "--set", "embed.image.input_size=32", "--set", "train.epochs=2", "--set", "train.hidden_dim=16",
           "--set", "ray.num_cpus=2"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=900, env=_env())
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout[-3000:]
    assert len(lines) <= 60, "\n".join(lines)
    noisy = [ln for ln in lines if any(m in ln for m in RAY_MARKERS)]
    assert not noisy, "\n".join(noisy)
    # no progress bar without a terminal (tqdm's refreshes are carriage-return lines with a rate)
    assert not [ln for ln in lines if "patient/s" in ln or "it/s" in ln], "\n".join(lines)
    # raypipe's own lines are all there: the epoch lines from the Ray Train worker, the stage summaries
    assert sum("omnifuse epoch" in ln for ln in lines) == 2 and sum("concat epoch" in ln for ln in lines) == 2
    for step in ("synth", "ingest", "embed", "train", "infer", "report"):
        assert any(ln.startswith(f"== demo step {step} (") for ln in lines), step
    # ... and Ray's lines went to the run log: driver loggers, worker output, the stage results
    log_text = (out / "logs" / "ray.log").read_text()
    assert "Started a local Ray instance" in log_text  # the `ray` logger on the driver
    assert "Execution plan of Dataset" in log_text  # the `ray.data` logger
    assert "(TrainController pid=" in log_text or "(RayTrainWorker pid=" in log_text  # forwarded worker output
    assert "demo step ingest" in log_text and "files_seen" in log_text  # a full result
